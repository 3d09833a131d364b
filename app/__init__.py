"""Quartermaster: the resource backend web collectors talk to over Kafka."""
