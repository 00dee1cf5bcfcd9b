-- Nexmark q3, local item suggestion: sellers in Oregon, Idaho or California with auctions
-- in category 10. The generator writes states in lower case ('or', 'id', 'ca'), so the
-- comparison is on lower-case codes.
-- Sources: CREATE SOURCE auction / person WITH (connector = 'nexmark', kind = …)
SELECT P.name, P.city, P.state, A.id
FROM auction AS A
JOIN person AS P ON A.seller = P.id
WHERE A.category = 10 AND (P.state = 'or' OR P.state = 'id' OR P.state = 'ca')
