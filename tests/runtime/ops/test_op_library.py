"""runtime/ops/library.py: ops defined with graph_op behave like torch.library.custom_op ones."""
import torch

from runtime.ops.library import graph_op


@graph_op("graphmode_test::scaled_add", mutates_args=("out",))
def scaled_add(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, alpha: float) -> None:
    out.copy_(x + alpha * y)


@scaled_add.register_fake
def _scaled_add_fake(x, y, out, alpha) -> None:
    return None


@graph_op("graphmode_test::double")
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double.register_fake
def _double_fake(x):
    return torch.empty_like(x)


def test_schema_is_inferred_with_the_mutation_annotated():
    schema = str(torch.ops.graphmode_test.scaled_add.default._schema)
    assert schema == "graphmode_test::scaled_add(Tensor x, Tensor y, Tensor(a2!) out, float alpha) -> ()"
    assert str(torch.ops.graphmode_test.double.default._schema) == "graphmode_test::double(Tensor x) -> Tensor"


def test_calling_the_object_dispatches_the_op():
    out = torch.zeros(3)
    scaled_add(torch.ones(3), torch.ones(3), out, 0.5)
    torch.testing.assert_close(out, torch.full((3,), 1.5))
    assert double.__name__ == "double" and double.__doc__ is None
    torch.testing.assert_close(double(torch.ones(2)), torch.full((2,), 2.0))


def test_compiled_graph_keeps_the_op_opaque_and_the_mutation():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    def f(x, y):
        out = torch.empty_like(x)
        torch.ops.graphmode_test.scaled_add(x, y, out, 2.0)
        return torch.ops.graphmode_test.double(out) + 1

    x, y = torch.randn(4), torch.randn(4)
    expected = (x + 2 * y) * 2 + 1
    torch.testing.assert_close(torch.compile(f, backend=backend, fullgraph=True)(x, y), expected)
    assert {"graphmode_test.scaled_add", "graphmode_test.double"} <= set(seen)
    # Through AOTAutograd the mutation is functionalized and put back: same result.
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x, y), expected)
