import json

from pydantic import ValidationError

from tinkex_recovery import RecoveryPolicy

config = json.loads('{"enabled": true, "poll_interval": 30, "checkpoint_strategy": "best", "max_recoveries": 5}')
policy = RecoveryPolicy.model_validate(config)  # a YAML or JSON dict; seconds throughout
patient = policy.replace(max_attempts=5, attempt_timeout=900)  # validated like a new policy
print(patient.max_attempts, patient.checkpoint_strategy)
try:
    RecoveryPolicy(enabled=True, poll_interval=-1)
except ValidationError as error:  # names the field
    print(error.errors()[0]["loc"])
