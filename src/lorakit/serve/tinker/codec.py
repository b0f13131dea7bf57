"""The Tinker wire formats: protobuf forward/backward requests and results, protobuf sample results,
JSON model inputs. The schema is the SDK's own (``tinker.proto.tinker_public_pb2``), imported here
so the server and the client can never disagree on a field number.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ...extras import require
from ...training.tokenwise import TokenDatum

require("tinker", "tinker", "lorakit serve --tinker")
from tinker.proto import tinker_public_pb2 as pb  # noqa: E402

PROTO = "application/x-protobuf"

_FLOAT_KEYS = ("weights", "logprobs", "advantages")


class WireError(ValueError):
    """A request the server cannot decode: the client's fault."""


def _tensor(msg: Any, where: str) -> torch.Tensor:
    """A proto ``Tensor`` as a torch tensor (sparse CSR densified with 0)."""
    if msg.dtype == pb.DTYPE_FLOAT32:
        dtype = np.float32
    elif msg.dtype == pb.DTYPE_INT64:
        dtype = np.int64
    elif msg.dtype == pb.DTYPE_INT32:
        dtype = np.int32
    else:
        raise WireError(f"{where}: unsupported tensor dtype {msg.dtype}")
    shape = list(msg.shape)
    try:
        if msg.HasField("sparse_csr"):
            if len(shape) != 2:
                raise WireError(f"{where}: a sparse tensor must be 2-D, got shape {shape}")
            values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
            crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
            col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
            return torch.sparse_csr_tensor(torch.from_numpy(crow.copy()), torch.from_numpy(col.copy()),
                                           torch.from_numpy(values.copy()), size=shape).to_dense()
        array = np.frombuffer(msg.dense, dtype=dtype).copy()
        if shape:
            array = array.reshape(shape)
    except (ValueError, RuntimeError) as err:
        raise WireError(f"{where}: malformed tensor: {err}") from None
    return torch.from_numpy(array)


def _tokens(chunks: Any, where: str) -> list[int]:
    tokens: list[int] = []
    for chunk in chunks:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(f"{where}: model_input chunk of type {kind!r} is not supported (text tokens only)")
        tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
    return tokens


def decode_forward_backward(body: bytes) -> tuple[dict, list[TokenDatum]]:
    """A protobuf ``ForwardBackwardRequest``: its header fields and its data as ``TokenDatum``s.

    Returns:
        ``({"model_id", "seq_id", "loss_fn", "loss_fn_config", "forward_only"}, data)``.
    """
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as err:  # protobuf's DecodeError
        raise WireError(f"the forward_backward body is not a ForwardBackwardRequest protobuf: {err}") from None
    config: dict[str, Any] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    data = []
    for i, datum in enumerate(msg.data):
        where = f"data[{i}]"
        inputs = {}
        for key, tensor in datum.loss_fn_inputs.items():
            value = _tensor(tensor, f"{where}.loss_fn_inputs[{key!r}]")
            inputs[key] = value.long() if key == "target_tokens" else value.float()
        data.append(TokenDatum(_tokens(datum.model_input, f"{where}.model_input"), inputs))
    head = {"model_id": msg.model_id, "seq_id": int(msg.seq_id), "loss_fn": msg.loss_fn,
            "loss_fn_config": config, "forward_only": bool(msg.forward_only)}
    return head, data


def _batched(arrays: Sequence[np.ndarray], dtype: int) -> Any:
    """Per-datum 1-D arrays as a proto ``BatchedTensor`` (concatenated bytes + byte offsets)."""
    sizes = [a.nbytes for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return pb.BatchedTensor(data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(), dtype=dtype)


def encode_forward_backward(outputs: dict[str, Sequence[torch.Tensor]], num_datums: int,
                            metrics: dict[str, float]) -> bytes:
    """A protobuf ``ForwardBackwardOutput``: ``outputs`` maps a field name to one (N,) float tensor
    per datum; ``metrics`` keys are ``name:reduction``."""
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=num_datums)
    for name, tensors in outputs.items():
        record.fields[name].CopyFrom(_batched([t.float().numpy().astype(np.float32) for t in tensors], pb.DTYPE_FLOAT32))
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record])
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()


def encode_sample(sequences: Sequence[tuple[list[int], list[float], str]],
                  prompt_logprobs: Optional[Sequence[float]] = None) -> bytes:
    """A protobuf ``SampleResponse``: ``(tokens, logprobs, 'stop' | 'length')`` per sequence, and the
    prompt's log-probs (NaN where there is none: the first token)."""
    out = pb.SampleResponse()
    for tokens, logprobs, reason in sequences:
        out.sequences.add(stop_reason=pb.STOP_REASON_STOP if reason == "stop" else pb.STOP_REASON_LENGTH,
                          tokens=np.asarray(tokens, dtype=np.int32).tobytes(),
                          logprobs=np.asarray(logprobs, dtype=np.float32).tobytes())
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return out.SerializeToString()


def json_tokens(model_input: Any, where: str) -> list[int]:
    """The token ids of a JSON ``ModelInput`` (``{"chunks": [{"type": "encoded_text", "tokens": [...]}]}``)."""
    chunks = model_input.get("chunks") if isinstance(model_input, dict) else None
    if not isinstance(chunks, list):
        raise WireError(f"{where} must be a ModelInput object with a 'chunks' list")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise WireError(f"{where}.chunks[{i}] of type {kind!r} is not supported (text tokens only)")
        ids = chunk.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise WireError(f"{where}.chunks[{i}].tokens must be a list of integers")
        tokens.extend(ids)
    return tokens
