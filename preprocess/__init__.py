"""Videos in, WebDataset shards out: dataset adapters, ffmpeg transcoding, shard writing."""
