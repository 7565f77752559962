"""One module per teacher kind (`selects(config)`, `load(config, context)`), listed in
`nlm.distill.teacher_loading.TEACHER_KINDS`."""
