"""Duplicates a hostile stream with one oversized reading produces, before de-duplication.

The issue's run: a valid stream with 19 hostile messages mixed in, one of them a 5 MB
reading that the broker accepts but whose dead letter the producer cannot send whole.
An embedded broker and Redis, a tiny untrained model (the scores do not matter here), and
one worker in a thread for at most ``--seconds``. Counts what reached each output topic
and how many of those records were copies:

    python benchmarks/poison_duplicates.py --out benchmarks/results/poison_duplicates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_detector import store, worker
from stream_detector.config import (
    KafkaSettings,
    KafkaTopics,
    ModelSettings,
    RedisSettings,
    Settings,
)
from stream_detector.consumer import ReadingConsumer
from stream_detector.devtools import loadgen
from stream_detector.devtools.services import (
    EmbeddedKafka,
    EmbeddedRedis,
    create_topics,
    free_port,
)
from stream_detector.devtools.tiny import tiny_model
from stream_detector.publisher import ReadingProducer

T0_MS = 1_700_000_000_000
HOSTILE = [
    b'{"sensor_id": "s-00000", "ts": ',
    b'{"sensor_id": "s-00000", "ts": 1700000000000, "value": NaN}',
    b'{"sensor_id": "s-00000", "ts": 1700000000000, "values": [1, 2]}',
    b'{"ts": 1700000000000, "value": 1.0}',
    b'{"sensor_id": "s-00000", "value": 1.0}',
    b"\xff\xfe",
    b"[]",
    b'"just a string"',
    b'{"sensor_id": "", "ts": 1700000000000, "value": 1}',
    b'{"sensor_id": "s", "ts": "yesterday", "value": 1}',
    b'{"sensor_id": "s", "ts": 1, "value": 1}',
    b'{"sensor_id": "s", "ts": 1700000000000, "value": "1"}',
    b'{"sensor_id": "s", "ts": 1700000000000, "value": 1e999}',
    b'{"sensor_id": "s", "ts": 1700000000000, "values": []}',
    b'{"sensor_id": "s", "ts": 1700000000000, "value": 1, "values": [1]}',
    b"{" * 5000,
    b'{"sensor_id": "s", "ts": 17000000000000000000, "value": 1}',
    b'{"sensor_id": "s", "ts": 1700000000000, "value": null}',
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--oversized-bytes", type=int, default=5_000_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    poison = b'{"sensor_id": "m7", "ts": 1700000100000, "value": "'
    poison += b"a" * (args.oversized_bytes - len(poison) - 2) + b'"}'
    hostile = [*HOSTILE, poison]
    plan = loadgen.LoadPlan(4, 1.0, 200, T0_MS, (), seed=1, sensor_prefix="s")
    valid = list(loadgen.messages(plan))

    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as d:
        suffix = uuid.uuid4().hex[:8]
        topics = KafkaTopics(
            readings=f"readings-{suffix}",
            scores=f"scores-{suffix}",
            alerts=f"alerts-{suffix}",
            dead_letters=f"dlq-{suffix}",
        )
        create_topics(kafka.bootstrap_servers, [topics.readings], 3)
        create_topics(kafka.bootstrap_servers, [topics.scores, topics.alerts, topics.dead_letters])
        producer = ReadingProducer(
            kafka.bootstrap_servers, topics.readings, config={"message.max.bytes": 8_388_608}
        )
        middle = len(valid) // 2
        for _, key, value in valid[:middle]:
            producer.send(key, value)
        for value in hostile:
            producer.send(None, value)
        for _, key, value in valid[middle:]:
            producer.send(key, value)
        producer.flush()

        model_store = Path(d) / "models"
        store.publish_version(
            model_store, "default", tiny_model(), thresholds={"default": {"threshold": 1e9}}
        )
        fast_groups = {"session_timeout_ms": 2000, "extra": {"heartbeat.interval.ms": "500"}}
        settings = Settings(
            kafka=KafkaSettings(
                bootstrap_servers=kafka.bootstrap_servers,
                group_id=f"workers-{suffix}",
                topics=topics,
                poll_timeout_ms=50,
                **fast_groups,
            ),
            redis=RedisSettings(url=redis.url, key_prefix=f"dup-{suffix}"),
            model=ModelSettings(store=str(model_store), current_poll_interval_s=0.2),
            window_length=32,
            stride=4,
            batch_deadline_ms=0,
            device="cpu",
            metrics_port=free_port(),
        )
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(settings, stop), daemon=True)
        started = time.monotonic()
        thread.start()

        expected_windows = plan.sensors * len(range(31, plan.readings_per_sensor, 4))
        reader = ReadingConsumer(
            kafka.bootstrap_servers,
            f"reader-{suffix}",
            [topics.scores, topics.dead_letters],
            config={"session.timeout.ms": 2000, "heartbeat.interval.ms": 500},
        )
        scores: Counter[tuple[str, int]] = Counter()
        dead_letters: Counter[str] = Counter()
        while time.monotonic() - started < args.seconds:
            for message in reader.poll_batch(1000, 0.2):
                if message.topic == topics.scores:
                    record = json.loads(message.value)
                    scores[(record["sensor_id"], record["ts_ms"])] += 1
                else:
                    headers = dict(message.headers)
                    dead_letters[headers["source_offset"].decode()] += 1
            if len(scores) == expected_windows and len(dead_letters) == len(hostile):
                break
        elapsed = time.monotonic() - started
        stop.set()
        thread.join(60)
        reader.close()

    result = {
        "seconds": round(elapsed, 1),
        "hostile": len(hostile),
        "oversized_bytes": len(poison),
        "dead_letters_unique": len(dead_letters),
        "dead_letters_received": dead_letters.total(),
        "dead_letter_duplicates": dead_letters.total() - len(dead_letters),
        "windows_expected": expected_windows,
        "windows_scored": len(scores),
        "score_duplicates": scores.total() - len(scores),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
