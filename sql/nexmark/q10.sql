-- Nexmark q10, log to file system: every bid with its day and minute as text, the
-- partition columns the original writes files by (a file sink over this view does that:
-- CREATE SINK … WITH (connector = 'file', …)).
-- Sources: CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', …)
SELECT auction, bidder, price, date_time, extra,
       to_char(date_time, '%Y-%m-%d') AS dt,
       to_char(date_time, '%H:%M') AS hm
FROM bid
