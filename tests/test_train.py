"""The optimizers training uses: torch's update rules, without torch's compiler front end."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from nmoe_models.config import OptimConfig, Stage3Config
from nmoe_models.train import GateOptimizer, eager, make_optimizer

CASES = [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}),
    (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 1e-4}),
    (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    (torch.optim.Muon, {"lr": 0.02, "weight_decay": 1e-4}),
]


def _train(cls: type[torch.optim.Optimizer], kwargs: dict, steps: int = 12) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    params = list(model.parameters())
    if issubclass(cls, torch.optim.Muon):  # Muon takes matrices only
        params = [p for p in params if p.dim() == 2]
    opt = cls(params, **kwargs)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_eager_optimizers_take_torchs_steps_bit_for_bit(cls, kwargs):
    stock_params, stock_state = _train(cls, kwargs)  # first: torch's class gets its step hooks patched in
    lean_params, lean_state = _train(eager(cls), kwargs)
    assert issubclass(eager(cls), cls) and eager(cls).__name__ == cls.__name__
    assert all(torch.equal(a, b) for a, b in zip(stock_params, lean_params, strict=True))
    assert stock_state["param_groups"] == lean_state["param_groups"]
    for key, slots in stock_state["state"].items():
        assert slots.keys() == lean_state["state"][key].keys()
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(lean_state["state"][key][name])), name
    # the state dict goes back in, and the next step still updates the parameters in place
    torch.manual_seed(5)
    model = nn.Linear(4, 4, bias=False)
    opt = eager(cls)([model.weight], **kwargs)
    opt.load_state_dict(opt.state_dict())
    model(torch.randn(3, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()  # under autograd, an in-place update of a leaf that requires grad would raise
    assert not torch.equal(before, model.weight) and model.weight.is_leaf


def test_training_never_imports_torchs_compiler():
    """Each optimizer the stages build, created and stepped in a fresh process, leaves
    ``torch._dynamo`` unimported (1.1 s of CPU and ~80 MB of heap in every process that trains)."""
    script = textwrap.dedent("""
        import sys
        import torch
        from torch import nn
        from nmoe_models.config import OptimConfig, Stage3Config
        from nmoe_models.train import GateOptimizer, make_optimizer, optimizer_step
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        for name in ("sgd", "adam", "adamw"):
            params = list(model.parameters())
            opt = make_optimizer(params, OptimConfig(name=name, weight_decay=1e-4, grad_clip=1.0))
            optimizer_step(opt, nn.functional.cross_entropy(model(x), y), params, 1.0)
            opt.load_state_dict(opt.state_dict())
        for kind in ("muon", "adamw"):
            gate_opt = GateOptimizer(model, Stage3Config(optimizer=kind))
            gate_opt.step(nn.functional.cross_entropy(model(x), y))
        print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_make_optimizer_builds_the_configured_rule():
    params = [nn.Parameter(torch.zeros(2, 2))]
    assert isinstance(make_optimizer(params, OptimConfig(name="sgd")), torch.optim.SGD)
    adam = make_optimizer(params, OptimConfig(name="adam"))
    assert isinstance(adam, torch.optim.Adam) and not isinstance(adam, torch.optim.AdamW)  # AdamW is an Adam
    assert isinstance(make_optimizer(params, OptimConfig(name="adamw")), torch.optim.AdamW)
    gate = GateOptimizer(nn.Linear(2, 2), Stage3Config(optimizer="muon"))
    assert len(gate.opts) == 2
    assert isinstance(gate.opts[0], torch.optim.Muon) and isinstance(gate.opts[1], torch.optim.AdamW)
