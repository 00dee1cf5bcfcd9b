-- Nexmark q18, find last bid: each bidder's last bid on each auction (the highest price
-- on a tie in time).
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT auction, bidder, price, channel, url, date_time, extra
FROM (
    SELECT *, row_number() OVER (PARTITION BY bidder, auction ORDER BY date_time DESC, price DESC) AS rank_number
    FROM bid
) B
WHERE rank_number <= 1
