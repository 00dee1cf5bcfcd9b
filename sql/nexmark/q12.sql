-- Nexmark q12, bids per user in a fixed window. The original counts in processing-time
-- windows (PROCTIME()); freshet has no processing-time attribute, because a view must
-- give the same answer when it is rebuilt, so this counts in 10-second event-time
-- windows of date_time instead.
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT bidder, count(*) AS bid_count, window_start, window_end
FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND)
GROUP BY bidder, window_start, window_end
