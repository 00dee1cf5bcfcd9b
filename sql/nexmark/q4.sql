-- Nexmark q4, average price per category: the average winning bid (the highest bid placed
-- while the auction was open) of the auctions in each category.
-- Sources: CREATE SOURCE auction / bid WITH (connector = 'nexmark', kind = …)
SELECT Q.category, avg(Q.final) AS avg_final
FROM (
    SELECT max(B.price) AS final, A.category
    FROM auction A
    JOIN bid B ON A.id = B.auction
    WHERE B.date_time BETWEEN A.date_time AND A.expires
    GROUP BY A.id, A.category
) Q
GROUP BY Q.category
