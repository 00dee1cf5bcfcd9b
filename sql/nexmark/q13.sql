-- Nexmark q13, bounded side input join: each bid joined with a side input keyed by
-- auction id modulo 10,000. The original reads the side input from a file; here it is a
-- constant relation in the query, which a view joins like any other input.
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT B.auction, B.bidder, B.price, B.date_time, S.value
FROM bid B
JOIN (SELECT value AS key, 'side-' || CAST(value AS VARCHAR) AS value FROM range(10000)) S
  ON B.auction % 10000 = S.key
