"""Python started with this folder on PYTHONPATH meets what Windows gives: no `fcntl` module.

.ci/run runs the suite a second time this way, with an ASCII locale encoding (stricter than
Windows' cp1252), to check the package on what a Windows desktop lacks; see the README's
"Supported systems".
"""

import sys

sys.modules["fcntl"] = None  # `import fcntl` now fails, as on Windows
