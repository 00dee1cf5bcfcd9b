-- Nexmark q9, winning bids: each auction with its winning bid, the highest bid placed
-- while it was open (the earliest one on a tie).
-- Sources: CREATE SOURCE auction / bid WITH (connector = 'nexmark', kind = …)
SELECT id, item_name, description, initial_bid, reserve, date_time, expires, seller, category,
       auction, bidder, price, bid_date_time
FROM (
    SELECT A.id, A.item_name, A.description, A.initial_bid, A.reserve, A.date_time, A.expires,
           A.seller, A.category, B.auction, B.bidder, B.price, B.date_time AS bid_date_time,
           row_number() OVER (PARTITION BY A.id ORDER BY B.price DESC, B.date_time ASC, B.bidder ASC) AS rownum
    FROM auction A
    JOIN bid B ON A.id = B.auction
    WHERE B.date_time BETWEEN A.date_time AND A.expires
) W
WHERE rownum <= 1
