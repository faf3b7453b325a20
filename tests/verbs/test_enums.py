import enum
import types

import pytest

from rdmapool.transport.verbs_enums import EnumTable


class ibv_wr_opcode(enum.IntEnum):  # noqa: N801 - named as pyverbs names it
    IBV_WR_RDMA_WRITE = 0
    IBV_WR_RDMA_READ = 4


def old_style() -> types.ModuleType:
    """Cython < 3.1: members copied into the module namespace."""
    m = types.ModuleType("enums")
    m.ibv_wr_opcode = ibv_wr_opcode
    m.IBV_WR_RDMA_READ = ibv_wr_opcode.IBV_WR_RDMA_READ
    m.IBV_WR_RDMA_WRITE = ibv_wr_opcode.IBV_WR_RDMA_WRITE
    return m


def new_style() -> types.ModuleType:
    """Cython >= 3.1: members only inside their enum class."""
    m = types.ModuleType("enums")
    m.ibv_wr_opcode = ibv_wr_opcode
    return m


@pytest.mark.parametrize("module", [old_style(), new_style()], ids=["module-level", "class-scoped"])
def test_both_enum_styles_resolve_to_plain_ints(module):
    table = EnumTable(module)
    assert table.IBV_WR_RDMA_READ == 4 and type(table.IBV_WR_RDMA_READ) is int
    assert table.IBV_WR_RDMA_WRITE == 0
    assert table.has("IBV_WR_RDMA_READ") and not table.has("IBV_WR_NOPE")
    with pytest.raises(AttributeError, match="IBV_WR_NOPE"):
        _ = table.IBV_WR_NOPE


def test_real_pyverbs_enums(pyverbs_enums):
    table = EnumTable(pyverbs_enums)
    # ibv_wc_status numbers are what rdmapool.transport.base.WcStatus mirrors
    from rdmapool.transport.base import WcStatus

    for status in WcStatus:
        assert table.__getattr__(f"IBV_WC_{status.name}") == status.value, status
    assert table.IBV_ACCESS_REMOTE_ATOMIC == 8 and table.IBV_QPT_RC == 2
