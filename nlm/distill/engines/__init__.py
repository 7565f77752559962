"""Loss engines: how one training batch's loss is evaluated, behind one interface (`base.LossEngine`).

- `fused`   the student's final hidden states and output head, chunk by chunk: no full logits.
- `simple`  full logits of the target rows at once (models that post-process logits, FSDP version 1).
- `aligned` a teacher with its own tokenizer: CE (fused) + a divergence over text-aligned groups.

`choose.choose_engine` picks one once, when the trainer is built, from what the teacher's signal is
(`Teacher.signal_kind`), `loss_impl` and the sharding; `chunks` holds the chunking both chunked engines share.
"""
