"""Block storage: the one BlockDevice interface and its implementations."""

from storaged.block.base import BlockDevice, BlockDeviceError
from storaged.block.file import FileBlockDevice

__all__ = ["BlockDevice", "BlockDeviceError", "FileBlockDevice"]
