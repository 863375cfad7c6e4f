from tinkex_recovery import RecoveryEngine, RecoveryPolicy
from tinkex_recovery.simulated import SimulatedTinker

service = SimulatedTinker()  # offline; on a live run pass your tinker.ServiceClient
client = service.create_lora_training_client(base_model="Qwen/Qwen3-8B")
client.save_state("step-000010", user_metadata={"step": "10"}).result()

policy = RecoveryPolicy(enabled=True, mode="observe", poll_interval=30)  # detect and choose; never restore
with RecoveryEngine(policy) as engine:
    engine.subscribe(lambda event: print(event.kind.value, event.checkpoint or ""))
    handle = engine.watch(client.model_id, service)
    service.corrupt(client.model_id)  # what the server does to a lost run
    handle.check_now()  # a poll now: `detected`, then `checkpoint_selected`
    observation = handle.observation()  # what a recovery would do (None while the run is healthy)
    print("would restore:", observation.checkpoint if observation else None)
print("runs on the server:", len(service.run_ids))  # still one: nothing was restored
