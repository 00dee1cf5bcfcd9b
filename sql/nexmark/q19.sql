-- Nexmark q19, auction top-10 price: the ten highest bids of each auction (the earlier
-- bid on a tie).
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT auction, bidder, price, channel, url, date_time, extra, rank_number
FROM (
    SELECT *, row_number() OVER (PARTITION BY auction ORDER BY price DESC, date_time ASC, bidder ASC) AS rank_number
    FROM bid
) B
WHERE rank_number <= 10
