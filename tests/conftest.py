"""Small shared fixtures: a tiny trainable setup and a directory snapshot helper."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Dict, Iterator

# One intra-op thread for torch, here and in every child (they inherit it): the models are
# tiny, and on a loaded machine OpenMP's spinning threads cost several times the work
# itself (the README example's 12 epochs: 47 s of CPU with 2 threads, 6 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import children
from tests.s3server import MotoServer

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch may have been imported before


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--seed", type=int, default=0,
                     help="seed of the tests that draw random kill points, delays and data (default 0: "
                          "every run is the same; pass another to explore)")


def pytest_report_header(config: pytest.Config) -> str:
    return f"ckpt test seed: {config.getoption('--seed')} (--seed N to change)"


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The ``--seed`` option: the same random choices on every run unless asked otherwise."""
    return int(request.config.getoption("--seed"))


class Trainables(dict):
    """model / optimizer / scheduler of a tiny MLP; ``step()`` changes all three."""

    def step(self) -> None:
        model, opt = self["model"], self["optimizer"]
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        self["scheduler"].step()

    def weights(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self["model"].state_dict().items()}


def make_trainables(seed: int = 0, hidden: int = 8) -> Trainables:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return Trainables(model=model, optimizer=opt, scheduler=sched)


@pytest.fixture
def trainables() -> Callable[..., Trainables]:
    """Factory: ``trainables(seed=0, hidden=8)`` builds a fresh model/optimizer/scheduler."""
    return make_trainables


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A checkpoint directory that does not exist yet."""
    return tmp_path / "run"


@pytest.fixture
def snapshot() -> Callable[[Path], Dict[str, bytes]]:
    """``snapshot(dir)``: every file name -> bytes, to assert that nothing changed."""
    def take(directory: Path) -> Dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
    return take


@pytest.fixture(scope="session")
def server() -> Iterator[MotoServer]:
    """A real S3-compatible server (moto, its own process), one for the whole session: each
    test works in a fresh :func:`bucket`; a test that must restart or break a server starts
    its own (a test that pauses this one resumes it in a ``finally``)."""
    srv = MotoServer()
    children.SESSION.add(srv.proc.pid)
    try:
        yield srv
    finally:
        srv.stop()
        children.SESSION.discard(srv.proc.pid)


@pytest.fixture(autouse=True)
def _no_child_left_behind() -> Iterator[None]:
    """Fail a test that leaves a child process of pytest alive or unreaped (a zombie):
    after its teardown, every child it started must be gone (see :mod:`children`)."""
    before = children.of_pytest()
    yield
    left = children.left_behind(before)
    if left:
        children.kill(left)
        pytest.fail(f"the test left child processes behind (now killed): {left}", pytrace=False)


@pytest.fixture
def bucket(server: MotoServer) -> str:
    """A fresh bucket on :func:`server` for each test."""
    import s3fs
    name = f"b{secrets.token_hex(6)}"
    s3fs.S3FileSystem(**server.options()).mkdir(name)
    return name
