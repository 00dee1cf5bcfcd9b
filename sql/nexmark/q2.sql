-- Nexmark q2, selection: the bids on a set of auctions (every 123rd auction id).
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT auction, price
FROM bid
WHERE auction % 123 = 0
