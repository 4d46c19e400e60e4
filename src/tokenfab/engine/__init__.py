"""One worker's inference engine: model, paged KV cache, scheduler, sampler, runner, step loop."""
