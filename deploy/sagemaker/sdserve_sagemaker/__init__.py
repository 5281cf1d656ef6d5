"""Deploy sdserve to Amazon SageMaker as a real-time or asynchronous endpoint.

Run it as `python -m sdserve_sagemaker COMMAND ...` (__main__.py), with the
package installed (`pip install -e ./deploy`: deploy/pyproject.toml) or on the
path (`PYTHONPATH=deploy/sagemaker`). Subcommands:

  package   build model.tar.gz from a diffusers folder (files at the archive
            root: SageMaker extracts it to /opt/ml/model, where `sdserve serve`
            looks for model_index.json)
  deploy    create the SageMaker model, endpoint config and endpoint, wait for
            InService, then set up autoscaling and CloudWatch alarms
  invoke    generate an image through a deployed endpoint (real-time or async)
  teardown  delete everything `deploy` created for a --name (idempotent)
  policy    print the least-privilege IAM policy for the execution role

Every AWS client honours --endpoint-url (or AWS_ENDPOINT_URL), so the tool can
be pointed at a stand-in such as moto_server. Exit codes: 0 success, 1 an AWS
call or the endpoint failed, 2 a usage mistake (bad argument, missing file...).
See README.md beside this package.

Modules: __main__ (`python -m`), cli (arguments, dispatch, exit codes), plan
(deploy's argument checks), deploy (deploy and teardown in order), package,
endpoint, scaling, alarms, invoke, iam (the policy), names, checks, aws (clients
and calls), errors.
"""

from .cli import main
from .errors import Failure, UserError
from .invoke import wait_for_async_result, write_images
from .package import package_model

__all__ = ["Failure", "UserError", "main", "package_model", "wait_for_async_result", "write_images"]
