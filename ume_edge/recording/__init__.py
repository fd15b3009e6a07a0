"""Robot recordings (MCAP files, rosbag2 folders) as sensor streams: read (``reader``), decode to arrays
(``decoders``), preprocess per modality (``preprocess``), replay through a ``SensorSync`` (``replay``), and write a data
set as a recording (``export``). The recording libraries are imported only when used: ``pip install
'ume-edge[sensors]'``."""
