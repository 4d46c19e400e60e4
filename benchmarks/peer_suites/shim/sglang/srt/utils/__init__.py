"""`sglang.srt.utils.kill_process_tree`: the runner owns the server, so a test's teardown
leaves it running."""


def kill_process_tree(pid: int | None, *args: object, **kwargs: object) -> None:
    return None
