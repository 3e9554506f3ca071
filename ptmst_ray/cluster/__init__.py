"""The cluster client: cluster YAML checks (:mod:`.spec`), the Ray Jobs API (:mod:`.jobs`) and the
launch / down plans (:mod:`.launch`) behind `ptmst-ray launch / status / logs / stop / down`."""
