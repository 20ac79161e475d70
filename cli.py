"""What every command line here shares: how a user's mistake is said, how a run says what it is doing, and how
Ctrl-C stops it.

    def main(argv=None):
        args = parser().parse_args(argv)
        cli.run(work, args)            # "error: ..." in one line and exit status 1, for what the user can fix
"""

import contextlib
import signal
import sys
import time

import parallel
import olmoe


def run(work, args, *, errors=(ValueError, OSError, RuntimeError), before_error=None):
    """work(args), with what the user can fix said as one line on stderr, "error: ...", by the first process only
    (not once per process under torchrun), and exit status 1; Ctrl-C exits with 130, without a traceback. A
    CheckpointError is said whole: offline, it lists the commands that make a model here. before_error() runs
    first, e.g. to end a line of streamed text."""
    try:
        return work(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except errors as e:  # olmoe.CheckpointError is a ValueError
        if before_error:
            before_error()
        if parallel.is_main_process():
            print(f"error: {e}" if isinstance(e, olmoe.CheckpointError) else f"error: {e}".splitlines()[0],
                  file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def saying(is_main, what):
    """'what ...' on stderr as a phase of the set-up starts, then what it found and how long it took, on the same
    line: a run says what it is doing from its first second. Yields a list; what is appended to it is said too."""
    said, t0 = [], time.perf_counter()
    if is_main:
        print(f"{what} ...", end=" ", file=sys.stderr, flush=True)
    try:
        yield said
    except BaseException:
        if is_main:
            print(file=sys.stderr, flush=True)  # an error starts on a line of its own
        raise
    if is_main:
        print(", ".join(said + [f"{time.perf_counter() - t0:.1f} s"]), file=sys.stderr, flush=True)


@contextlib.contextmanager
def ctrl_c_deferred():
    """Ctrl-C, inside, sets a flag instead of raising: yields a list that is empty until Ctrl-C is pressed, so that
    a loop finishes the step under way and saves it. A second SIGINT cannot break into the saving either: a
    terminal's Ctrl-C reaches torchrun's workers twice, once directly and once forwarded by torchrun. The handler
    before is put back on leaving."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
