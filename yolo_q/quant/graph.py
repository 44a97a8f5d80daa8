"""Graph analysis of a fused float model (``torch.fx`` symbolic trace of the eval forward).

Finds the quantizable layers in execution order, the activation module that directly follows
each conv (absorbed into the quantized layer), which tensors are known to be >= 0, and the
*scale classes* used to share one amax:

    Tensors joined by a ``torch.cat`` (its output and every input) or by a quantized max-pool
    (output and input: int8 max-pooling keeps the scale) belong to one class. Every activation
    quantizer that reads a tensor of a class (input quantizers of the consuming layers, output
    quantizers of the producing layers) gets the maximum amax of the class.

So all inputs of a Concat, its output and every other reader of those tensors end on one
scale, which is what TensorRT needs to run the Concat in INT8 without re-quantization.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

QUANTIZABLE = (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)
ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu",
               nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid"}
NONNEG_ACTS = ("relu", "relu6", "sigmoid")
_CAT = (torch.cat, torch.concat)


class GraphError(RuntimeError):
    """The model cannot be traced or analysed for quantization."""


@dataclass
class LayerNode:
    name: str  # module path
    kind: str  # conv | conv_transpose | maxpool
    calls: List[fx.Node] = field(default_factory=list)
    act: str = ""  # module path of the absorbed activation ('' = none)
    act_type: str = ""  # relu | silu | ... ('' = none)
    act_node: Optional[fx.Node] = None

    @property
    def out_nodes(self) -> List[fx.Node]:
        """The tensor(s) this layer produces (after the absorbed activation)."""
        return [self.act_node] if self.act_node is not None else list(self.calls)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolic trace of ``model``'s eval-mode forward (the train flag is restored)."""
    was_training = model.training
    model.eval()
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - re-raise with context
        raise GraphError(f"torch.fx could not trace the model's eval forward for quantization "
                         f"({type(e).__name__}: {e})") from None
    finally:
        model.train(was_training)


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.ConvTranspose2d):
        return "conv_transpose"
    if isinstance(m, nn.Conv2d):
        return "conv"
    return "maxpool"


class ModelGraph:
    """Layers, activations, non-negativity and scale classes of a traced float model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.gm = trace(model)
        self.modules = dict(model.named_modules())
        self.layers: Dict[str, LayerNode] = {}
        module_calls: Dict[str, List[fx.Node]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                module_calls.setdefault(node.target, []).append(node)
                m = self.modules[node.target]
                if isinstance(m, QUANTIZABLE) and not isinstance(m, nn.Identity):
                    layer = self.layers.setdefault(node.target, LayerNode(node.target, _kind(m)))
                    layer.calls.append(node)
        self.module_calls = module_calls
        for layer in self.layers.values():
            self._find_act(layer)

    def _find_act(self, layer: LayerNode) -> None:
        if layer.kind == "maxpool" or len(layer.calls) != 1:
            return
        users = list(layer.calls[0].users)
        if len(users) != 1 or users[0].op != "call_module":
            return
        act_node = users[0]
        act = self.modules[act_node.target]
        act_type = ACTIVATIONS.get(type(act))
        if act_type is None or len(self.module_calls[act_node.target]) != 1:
            return
        if act_node.args[0] is not layer.calls[0]:
            return
        layer.act, layer.act_type, layer.act_node = act_node.target, act_type, act_node

    # ------------------------------------------------------------------------- queries
    def producer_layer(self, node: fx.Node) -> Optional[str]:
        """Name of the layer whose output tensor is ``node`` (None if none)."""
        for layer in self.layers.values():
            if node in layer.out_nodes:
                return layer.name
        return None

    def nonneg(self, node: fx.Node, _memo=None) -> bool:
        """Whether the tensor ``node`` is provably >= 0. The network input counts as >= 0
        (images in [0, 1])."""
        memo = {} if _memo is None else _memo
        if node in memo:
            return memo[node]
        memo[node] = False  # cycle guard
        res = False
        if node.op == "placeholder":
            res = True
        elif node.op == "call_module":
            m = self.modules[node.target]
            if ACTIVATIONS.get(type(m)) in NONNEG_ACTS:
                res = True
            elif isinstance(m, (nn.MaxPool2d, nn.Identity)) and node.args:
                res = isinstance(node.args[0], fx.Node) and self.nonneg(node.args[0], memo)
        elif node.op == "call_function" and node.target in _CAT:
            ins = node.args[0]
            res = all(isinstance(a, fx.Node) and self.nonneg(a, memo) for a in ins)
        elif node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
            res = True
        memo[node] = res
        return res

    def scale_classes(self, maxpools: set) -> Dict[fx.Node, fx.Node]:
        """Union-find representative of every node, linking cat in/out and the in/out of the
        quantized max-pools named in ``maxpools``."""
        parent: Dict[fx.Node, fx.Node] = {}

        def find(n):
            parent.setdefault(n, n)
            while parent[n] is not n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        def union(a, b):
            ra, rb = find(a), find(b)
            if ra is not rb:
                parent[ra] = rb

        for node in self.gm.graph.nodes:
            find(node)
            if node.op == "call_function" and node.target in _CAT:
                for a in node.args[0]:
                    if isinstance(a, fx.Node):
                        union(node, a)
            elif node.op == "call_module" and node.target in maxpools:
                union(node, node.args[0])
        return {n: find(n) for n in parent}

    def cat_nodes(self) -> List[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target in _CAT]
