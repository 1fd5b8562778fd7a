import sys
import warnings

# megatron-core warns at import that TransformerEngine/Apex are absent: irrelevant to data tools.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from data_tools.cli import main  # noqa: E402

sys.exit(main())
