"""Chat with a converted Mini-InternVL checkpoint; answers stream as they are generated.

  mivl-chat --checkpoint DIR --image a.jpg "What is in the image?"
  mivl-chat --checkpoint DIR --image a.jpg        # interactive
  mivl-chat --checkpoint DIR --image a.jpg --image b.jpg "Compare."
  mivl-chat --checkpoint DIR --video v.mp4 --num-frames 8 "What happens?"

Interactive commands: /image PATH and /video PATH [N] (add to the next question), /reset
(forget the conversation and its images), /exit. Several images are labelled `Image-k:` and
share the tile budget; a video is N frames of one tile each (`Frame1:` ...), as in InternVL2.
"""

from __future__ import annotations

import argparse
import sys

from mini_internvl_jax.data.errors import SkipSample
from mini_internvl_jax.data.processing import decode_rgb, open_image
from mini_internvl_jax.data.video import DEFAULT_NUM_FRAMES, MAX_NUM_FRAMES
from mini_internvl_jax.errors import UserError, user_error
from mini_internvl_jax.infer.runtime import add_model_args, load_runtime
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
    p.add_argument("question", nargs="?", help="ask once and exit (default: interactive)")
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
        except (ValueError, ImportError) as e:  # unreadable image or video: keep the session
            print(f"\nerror: {e}", file=sys.stderr)


def _check_image(path: str) -> None:
    """Decodes an --image before the model is loaded: a bad path fails in a second, not after
    minutes of loading."""
    try:
        decode_rgb(open_image(path), path)
    except SkipSample as e:
        raise ValueError(f"--image {e.detail}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 1 <= args.num_frames <= MAX_NUM_FRAMES:
            raise ValueError(f"--num-frames must be from 1 to {MAX_NUM_FRAMES}, got "
                             f"{args.num_frames}")
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        for path in args.image:  # before the model is loaded
            _check_image(path)
        runtime = load_runtime(args, default_max_num=12)
    except (UserError, ValueError, OSError, ImportError) as e:
        print(f"error: {user_error(e) or e}", file=sys.stderr)
        return 2
    session = ChatSession(runtime, sampling, args.max_new_tokens or 1024, args.seed)
    try:
        for path in args.image:
            session.add_image(path)
        if args.video:
            session.add_video(args.video, args.num_frames)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {user_error(e) or e}", file=sys.stderr)
        return 2
    if args.question is None:
        _interactive(session, args.num_frames)
        return 0
    try:
        _answer(session, args.question)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
