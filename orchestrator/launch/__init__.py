"""Launching runs on Ray: Ray Train (`ray_train`), Tune sweeps (`tune`, `pbt`, `search_space`,
`sweep_report`), the progressive scaling job (`progressive`) and the study of scale (`study`)."""
