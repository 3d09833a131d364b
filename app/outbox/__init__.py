"""The transactional outbox: the only way anything of Quartermaster reaches Kafka."""
