-- Nexmark q11, user sessions: how many bids each user makes in each session of
-- activity, a session ending after 10 seconds without a bid.
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT B.bidder, count(*) AS bid_count, B.window_start AS starttime, B.window_end AS endtime
FROM SESSION(bid, date_time, INTERVAL '10' SECOND) B
GROUP BY B.bidder, B.window_start, B.window_end
