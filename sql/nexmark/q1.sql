-- Nexmark q1, currency conversion: each bid's price from dollars to euros.
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT auction, bidder, 0.908 * price AS price, date_time, extra
FROM bid
