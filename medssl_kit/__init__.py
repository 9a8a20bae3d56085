"""medssl_kit: dense self-supervised pre-training on medical images."""

import logging
import warnings

__version__ = "0.1.0"

# MONAI's GPU DICOM reader (NvImgCodecPydicomReader), built by every LoadImage, announces that its
# optional nvImageCodec decoder is missing — a warning plus a log line that reach the user in every
# command and notebook although reading falls back to pydicom as it should. Silence exactly those.
warnings.filterwarnings(
    "ignore", message=r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register"
)


class _NoCodecNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("nvImageCodec is not available")


logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(_NoCodecNotice())
