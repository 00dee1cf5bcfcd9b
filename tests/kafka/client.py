"""An independent Kafka client for tests/kafka.rs, built on kafka-python (pure Python, no
librdkafka), so freshet's reading and writing are checked against someone else's code.

    client.py produce BROKERS TOPIC   < records   one JSON object per line:
                                                  {"value": str | null, "key": str?, "partition": int?}
    client.py produce-avro BROKERS TOPIC SCHEMA < records
                                                  the same, but each "value" is an object written
                                                  as one Avro datum of the JSON schema SCHEMA (with
                                                  fastavro), or {"raw_hex": "…"} for other bytes
    client.py consume BROKERS TOPIC N             prints the first N records of every partition
                                                  together, one JSON object per line:
                                                  {"partition", "offset", "key", "value"}
    client.py consume-committed BROKERS TOPIC     prints every committed record (isolation level
                                                  read_committed) as consume does, once none has
                                                  arrived for 3 seconds
"""
import json
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def encode(text):
    return None if text is None else text.encode("utf-8")


def avro_encoder(schema_text):
    import io
    import fastavro

    schema = fastavro.parse_schema(json.loads(schema_text))

    def encode_avro(value):
        if "raw_hex" in value:
            return bytes.fromhex(value["raw_hex"])
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, value)
        return out.getvalue()
    return encode_avro


def produce(brokers, topic, encode_value=encode):
    producer = KafkaProducer(bootstrap_servers=brokers, linger_ms=5)
    sent = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        record = json.loads(line)
        value = record.get("value")
        producer.send(topic, value=None if value is None else encode_value(value), key=encode(record.get("key")),
                      partition=record.get("partition"))
        sent += 1
    producer.flush(timeout=60)
    producer.close()
    print(sent)


def consume(brokers, topic, wanted, isolation_level="read_uncommitted", idle=None):
    consumer = KafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False, group_id=None,
                             isolation_level=isolation_level)
    deadline = time.time() + 60
    partitions = None
    while partitions is None and time.time() < deadline:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            time.sleep(0.2)
    if partitions is None:
        sys.exit(f"topic {topic} has no partitions")
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    records = []
    last = time.time()
    while len(records) < wanted and time.time() < deadline:
        if idle is not None and time.time() - last > idle:
            break
        for batch in consumer.poll(timeout_ms=500).values():
            last = time.time()
            for m in batch:
                records.append({
                    "partition": m.partition,
                    "offset": m.offset,
                    "key": None if m.key is None else m.key.decode("utf-8"),
                    "value": None if m.value is None else m.value.decode("utf-8"),
                })
    consumer.close()
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    command, brokers, topic = sys.argv[1:4]
    if command == "produce":
        produce(brokers, topic)
    elif command == "produce-avro":
        produce(brokers, topic, avro_encoder(sys.argv[4]))
    elif command == "consume":
        consume(brokers, topic, int(sys.argv[4]))
    elif command == "consume-committed":
        consume(brokers, topic, float("inf"), isolation_level="read_committed", idle=3)
    else:
        sys.exit(f"unknown command {command}")
