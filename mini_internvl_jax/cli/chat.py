"""Chat with a converted Mini-InternVL checkpoint; answers stream as they are generated.

  mivl-chat --checkpoint DIR --image a.jpg "What is in the image?"
  mivl-chat --checkpoint DIR --image a.jpg        # interactive
  mivl-chat --checkpoint DIR --image a.jpg --image b.jpg "Compare."
  mivl-chat --checkpoint DIR --video v.mp4 --num-frames 8 "What happens?"
  mivl-chat --checkpoint DIR mesh.tensor=2 "Hello"   # parameters over 2 devices

Interactive commands: /image PATH and /video PATH [N] (add to the next question), /reset
(forget the conversation and its images), /exit. Several images are labelled `Image-k:` and
share the tile budget; a video is N frames of one tile each (`Frame1:` ...), as in InternVL2.
"""

from __future__ import annotations

import argparse
import sys

from mini_internvl_jax.cli._shell import (
    MESH_HELP,
    ExitCode,
    UsageError,
    add_model_args,
    command,
    is_override,
    load_runtime,
    parse_args,
)
from mini_internvl_jax.data.errors import SkipSample
from mini_internvl_jax.data.processing import decode_rgb, open_image
from mini_internvl_jax.data.video import DEFAULT_NUM_FRAMES, MAX_NUM_FRAMES
from mini_internvl_jax.errors import user_error
from mini_internvl_jax.infer.sampling import SamplingConfig
from mini_internvl_jax.infer.session import ChatSession

HELP = "commands: /image PATH, /video PATH [N], /reset, /exit (or end of input)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mivl-chat",
                                description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image for the first question (repeat for several)")
    p.add_argument("--video", metavar="PATH", help="video for the first question")
    p.add_argument("--num-frames", type=int, default=DEFAULT_NUM_FRAMES, metavar="N",
                   help=f"frames taken from a video (default {DEFAULT_NUM_FRAMES})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("words", nargs="*", metavar="[KEY=VALUE ...] [QUESTION]",
                   help=f"{MESH_HELP}; then the question to ask once and exit (default: "
                        "interactive)")
    return p


def _answer(session: ChatSession, question: str) -> None:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    session.ask(question, write)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _interactive(session: ChatSession, num_frames: int) -> None:
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            print("(conversation and images cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr)
                continue
            session.add_image(path)
            continue
        if line.startswith("/video"):
            parts = line[len("/video"):].split()
            n = parts[1] if len(parts) == 2 else str(num_frames)
            if not 1 <= len(parts) <= 2 or not n.isdigit() or int(n) < 1:
                print(f"usage: /video PATH [N]  (N frames, default {num_frames})",
                      file=sys.stderr)
                continue
            session.add_video(parts[0], int(n))
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=sys.stderr)
            continue
        try:
            sys.stdout.write("assistant> ")
            _answer(session, line)
        except Exception as e:  # noqa: BLE001 - an unreadable image or video: keep the session
            if (msg := user_error(e)) is None:
                raise
            print(f"\nerror: {msg}", file=sys.stderr)


def _check_image(path: str) -> None:
    """Decodes an --image before the model is loaded: a bad path fails in a second, not after
    minutes of loading."""
    try:
        decode_rgb(open_image(path), path)
    except SkipSample as e:
        raise UsageError(f"--image {e.detail}") from None


@command
def main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    overrides = [w for w in args.words if is_override(w)]
    question = [w for w in args.words if not is_override(w)]
    if len(question) > 1:
        raise UsageError(f"one question (quoted) after the overrides, got {len(question)} "
                         f"words: {question}")
    if not 1 <= args.num_frames <= MAX_NUM_FRAMES:
        raise UsageError(f"--num-frames must be from 1 to {MAX_NUM_FRAMES}, got "
                         f"{args.num_frames}")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for path in args.image:  # before the model is loaded
        _check_image(path)
    runtime = load_runtime(args, overrides, default_max_num=12)
    session = ChatSession(runtime, sampling, args.max_new_tokens or 1024, args.seed)
    for path in args.image:
        session.add_image(path)
    if args.video:
        session.add_video(args.video, args.num_frames)
    if not question:
        _interactive(session, args.num_frames)
        return ExitCode.OK
    _answer(session, question[0])
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
