# megatron-core's torch.compile decorators run at the first call instead of at import (megaslm/import_hooks.py says
# why: ~4 CPU-seconds per process). Standard library only: megaslm's torch-free modules stay torch-free.
from megaslm import import_hooks as _import_hooks

_import_hooks.install()
