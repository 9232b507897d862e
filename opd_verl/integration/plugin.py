"""veRL plugin entry point (group `verl.plugins`, loaded by `import verl` unless VERL_USE_EXTERNAL_PLUGINS=none).

Importing this module registers every opd_verl name in veRL's registries and makes veRL's model building work
beside TRL releases without the value-head model (`opd_verl.integration.trl_compat`). veRL logs a failing plugin
only at DEBUG level, so a failure is reported here on stderr before it propagates.
"""

from __future__ import annotations

import sys

try:
    from opd_verl.integration.registry import register
    from opd_verl.integration.trl_compat import patch_trl_detection

    register()
    patch_trl_detection()
except Exception as err:  # noqa: BLE001 - report loudly, then re-raise for veRL's loader
    print(f"opd_verl: registering the plugin in veRL failed: {type(err).__name__}: {err}", file=sys.stderr)
    raise
