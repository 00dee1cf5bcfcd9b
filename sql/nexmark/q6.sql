-- Nexmark q6, average selling price by seller: for each seller, the average winning price
-- of their last 10 closed auctions.
-- Sources: CREATE SOURCE auction / bid WITH (connector = 'nexmark', kind = …)
--
-- freshet cannot run this query yet: the average over the last 10 auctions is a window
-- function over a frame (avg(…) OVER (PARTITION BY seller ORDER BY … ROWS BETWEEN 9
-- PRECEDING AND CURRENT ROW)), and views support row_number() top-N only. Flink cannot
-- run the original either. The query below is what freshet will accept once views
-- maintain framed window aggregates.
SELECT Q.seller, avg(Q.final) OVER (PARTITION BY Q.seller ORDER BY Q.date_time ROWS BETWEEN 9 PRECEDING AND CURRENT ROW) AS avg_final
FROM (
    SELECT max(B.price) AS final, A.seller, max(B.date_time) AS date_time
    FROM auction A
    JOIN bid B ON A.id = B.auction
    WHERE B.date_time BETWEEN A.date_time AND A.expires
    GROUP BY A.id, A.seller
) Q
