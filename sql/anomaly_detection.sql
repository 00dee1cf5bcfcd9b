-- Anomaly detection on device telemetry, end to end (walked through in README.md).
--
--   telemetry generator → history of normal readings → kmeans model
--     → `anomalies` view scoring every live reading → Kafka sink → dashboard query
--
-- Run it with psql against a running freshet:
--   psql -h 127.0.0.1 -p 6543 -U freshet -d freshet -f sql/anomaly_detection.sql
-- Lines `-- wait until: QUERY = N` are steps to wait for: run QUERY until it returns N
-- (tests/models.rs runs this file and waits there).

-- 1. History: 4,000 readings of 20 devices that maintenance confirmed normal. The
--    generator labels its anomalies, so the history keeps the normal ones only.
CREATE SOURCE telemetry_history WITH (
    connector = 'telemetry', devices = '20', seed = '7', anomaly_rate = '0',
    rate = '0', events = '4000', base_time = '1767225600000');
-- wait until: SELECT count(*) FROM telemetry_history = 4000

-- 2. The model: kmeans over temperature and vibration. Vibration is scaled by 10 so that
--    both features span similar ranges (kmeans measures plain Euclidean distance). It is
--    retrained from the same query every hour; views switch to each new version at the
--    next barrier.
CREATE MODEL normal_ops USING kmeans (k = 20, n_runs = 3, seed = 1)
    WITH (retrain_every = '1 hour')
    AS SELECT temperature, vibration * 10 AS vibration_x10 FROM telemetry_history;

-- 3. Live readings from the same 20 devices; about 1% are anomalies (the generator labels
--    them in column `anomaly`, which freshet does not use to score: it is there to measure
--    precision and recall).
CREATE SOURCE telemetry WITH (
    connector = 'telemetry', devices = '20', seed = '7', anomaly_rate = '0.01', rate = '2000');

-- 4. Every reading further than 4 from the nearest normal operating point is an anomaly.
--    Each row carries the model version that scored it.
CREATE MATERIALIZED VIEW anomalies AS
    SELECT device_id, ts, temperature, vibration,
           score('normal_ops', temperature, vibration * 10) AS distance,
           score_version('normal_ops') AS model_version,
           anomaly AS labelled
    FROM telemetry
    WHERE score('normal_ops', temperature, vibration * 10) > 4.0;

-- 5. The anomaly handler reads a Kafka topic: one JSON message per anomaly.
CREATE SINK anomaly_alerts FROM anomalies
    WITH (connector = 'kafka', brokers = 'localhost:9092', topic = 'anomalies') FORMAT JSON;

-- 6. The dashboard: anomalies per device per minute, kept up to date.
CREATE MATERIALIZED VIEW anomalies_per_minute AS
    SELECT device_id, date_trunc('minute', ts) AS minute, count(*) AS anomalies
    FROM anomalies
    GROUP BY device_id, date_trunc('minute', ts);

-- wait until: SELECT least(count(*), 20000) FROM telemetry = 20000
FLUSH;

-- The dashboard query: the devices with the most anomalies in the latest minutes.
SELECT device_id, minute, anomalies
FROM anomalies_per_minute
ORDER BY minute DESC, anomalies DESC, device_id
LIMIT 10;

-- How good is the model? Precision: flagged readings that were anomalies; recall:
-- anomalies that were flagged. (One query reads the view and the source at one epoch.)
SELECT (SELECT count(*) FROM anomalies WHERE labelled) AS true_positives,
       (SELECT count(*) FROM anomalies) AS flagged,
       (SELECT count(*) FROM telemetry WHERE anomaly) AS actual_anomalies;

SHOW MODELS;
DESCRIBE MODEL normal_ops;
