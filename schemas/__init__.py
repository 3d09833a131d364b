"""Pydantic models of every Kafka message and the state enums; pure, no I/O."""
