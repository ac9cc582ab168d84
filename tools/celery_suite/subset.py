"""Which parts of Celery's integration suite the runs take."""

from __future__ import annotations

# Never collected: needs the Azure SDK and an Azure account (AZUREBLOCKBLOB_URL).
IGNORED = ("t/integration/test_backend.py",)

CI_SUBSET = ("t/integration/test_tasks.py::test_task_replacement",)
