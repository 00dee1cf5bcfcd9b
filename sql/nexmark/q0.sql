-- Nexmark q0, pass-through: every bid, unchanged. Measures the cost of moving events
-- through the engine with no work on them.
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT auction, bidder, price, date_time, extra
FROM bid
