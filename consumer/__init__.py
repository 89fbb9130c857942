"""The streaming service: Kafka photos in, one match event per photo out."""
