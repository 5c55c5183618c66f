"""The cluster's agent fencer: fence-agents agents run as stonithd runs them
(stdin options), per-node fence delays, and the two-node race: with one
node's static delay, exactly one node keeps its access in 20 splits, and a
fenced node does not fence back."""

from __future__ import annotations

import asyncio
import random
import sys

import pytest

from fence.client import Endpoint
from storaged.cluster.config import ClusterConfig, NodeEntry
from storaged.cluster.fencing import AgentFencer, make_fencer
from storaged.state import ValidationError
from tests.support import free_port, running, storaged
from tests.test_fence_mgmt import PASSWORD, _wait


def _config(**kw) -> ClusterConfig:
    cfg = ClusterConfig(name="c", nodes={1: NodeEntry("127.0.0.1:7001", name="alpha",
                                                      fence_delay_ms=1000),
                                         2: NodeEntry("127.0.0.1:7002")}, **kw)
    cfg.validate()
    return cfg


def test_config_delays_and_names():
    cfg = _config(fence_delay_ms=100, fence_delay_max_ms=500, fencer="agent",
                  fence_agent="fence_storaged", fence_options={"ip": "127.0.0.1"})
    assert cfg.node_name(1) == "alpha" and cfg.node_name(2) == "node2"
    rng = random.Random(7)
    d1 = [cfg.fence_delay(1, rng) for _ in range(200)]
    d2 = [cfg.fence_delay(2, rng) for _ in range(200)]
    assert 1.1 <= min(d1) and max(d1) <= 1.6 and max(d1) - min(d1) > 0.3
    assert 0.1 <= min(d2) and max(d2) <= 0.6
    f = make_fencer(cfg.fencer, config=cfg, node_id=2)
    assert isinstance(f, AgentFencer) and f.self_name == "node2"
    assert f.stdin("off", "alpha") == b"action=off\nplug=alpha\nip=127.0.0.1\n"
    back = ClusterConfig.from_dict(cfg.to_dict())
    assert back.nodes[1].fence_delay_ms == 1000 and back.fence_options == {"ip": "127.0.0.1"}
    for bad, msg in (({"fencer": "agent"}, "needs fence_agent"),
                     ({"fence_options": {"plug": "x"}}, "must not set action or plug"),
                     ({"fence_delay_max_ms": -1}, "fence_delay_max_ms")):
        with pytest.raises(ValidationError, match=msg):
            _config(**bad)


def _agent_script(tmp_path) -> str:
    path = tmp_path / "fence_storaged"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m fence.storaged_agent "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow
def test_agent_fencer_two_node_race(tmp_path):
    directory = str(tmp_path / "d")
    with running(directory):
        mport = free_port()
        storaged("fence", "map", "alpha", "--initiator", "iqn.2026-11.test:alpha",
                 directory=directory)
        storaged("fence", "map", "node2", "--initiator", "iqn.2026-11.test:beta",
                 directory=directory)
        storaged("mgmt", "listen", f"127.0.0.1:{mport}", directory=directory)
        storaged("mgmt", "user-add", "agent", "--password-stdin", directory=directory,
                 input=PASSWORD + "\n")
        _wait(mport)
        cfg = _config(fencer="agent", fence_agent=_agent_script(tmp_path), fence_delay_max_ms=200,
                      fence_options={"ip": "127.0.0.1", "ipport": str(mport),
                                     "username": "agent", "password": PASSWORD})
        # The winner's head start must exceed one fence action (pcmk_delay_base
        # guidance): a loaded CI machine takes over a second to run the agent.
        cfg.nodes[1].fence_delay_ms = 2500
        fencers = {n: make_fencer("agent", config=cfg, node_id=n) for n in (1, 2)}
        ep = Endpoint("127.0.0.1", mport, "agent", PASSWORD)

        async def split() -> dict[str, bool]:
            async def side(me: int) -> bool:
                other = 3 - me
                await asyncio.sleep(cfg.fence_delay(other))
                return await fencers[me].fence(other, 1)
            r1, r2 = await asyncio.gather(side(1), side(2))
            return {"alpha_fenced_beta": r1, "beta_fenced_alpha": r2}

        winners = []
        for _ in range(20):
            for node in ("alpha", "node2"):
                ep.call("fence_on", {"node": node})
            result = asyncio.run(split())
            access = {n: not ep.call("fence_status", {"node": n})["fenced"]
                      for n in ("alpha", "node2")}
            assert sum(access.values()) == 1, (result, access)
            assert result == {"alpha_fenced_beta": True, "beta_fenced_alpha": False}
            winners.append(next(n for n, ok in access.items() if ok))
        assert winners == ["alpha"] * 20
        # node2 asked for its own status and refused to fence back
        assert ("status", "node2", 2) in fencers[2].calls
        assert not any(a == "off" for a, _p, _rc in fencers[2].calls)
        ep.close()
