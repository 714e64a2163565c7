"""Where a compiled program's time goes: the top ops of a jax.profiler trace (shared by the
benchmarks' --profile)."""

from __future__ import annotations


def profile_top(run_steps, hlo_text: str, trace_dir: str, steps: int = 2, top: int = 15):
    """Trace `steps` steps with jax.profiler and return the ops that took the most time
    per step, grouped by HLO op kind, shape and source (layer index folded), as
    [seconds, share, kind, shape, source]. Reads the trace with TensorFlow's xplane proto."""
    import collections
    import glob
    import re

    import jax
    from prealign_jax.tf_cpu import import_tf

    import_tf()
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with jax.profiler.trace(trace_dir):
        run_steps(steps)
    space = xplane_pb2.XSpace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    source = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name="([^"]*)"', line)
        if m:
            source.setdefault(m.group(1), (m.group(2).split("{")[0],
                                           re.sub(r"layers_\d+", "L", m.group(3))))
    by_op = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name in source:
                    shape, src = source[name]
                    by_op[(name.rsplit(".", 1)[0], shape, src[-80:])] += event.duration_ps
    total = sum(by_op.values())
    return [[round(t / 1e12 / steps, 4), round(t / total, 3), *key]
            for key, t in by_op.most_common(top)]
