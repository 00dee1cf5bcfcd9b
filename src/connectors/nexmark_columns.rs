//! Nexmark events written straight into Arrow columns.
//!
//! [`NexmarkColumns`] produces the person, auction and bid columns that the `nexmark`
//! crate's `EventGenerator` (with a type filter and an offset) yields for the same
//! `NexmarkConfig`, value for value: every event seeds `SmallRng` with its event id, as the
//! crate does, and draws the same values in the same order, with the same `rand` 0.8
//! samplers. What it leaves out is the crate's cost per row: no `Event` with owned
//! Strings, no `format!`, no cloned channel and url; the config's tables are prepared once
//! and strings go straight into the column builders.
//!
//! It must not change a draw: moving, adding or skipping one changes every later value of
//! that event. The tests below compare every column with the crate's own events.
//!
//! Not replicated: the crate's rate shapes (freshet sets `first_rate = next_rate`; event
//! time advances at `first_rate`) and `first_event_number` (freshet positions a generator
//! by offset and leaves it 0).

use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMillisecondArray};
use datafusion::arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use nexmark::config::NexmarkConfig;
use nexmark::event::EventType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// One in this many people (auctions) is a hot seller or bidder (hot auction), as in the
/// crate.
const HOT_BLOCK: usize = 100;

/// The channels a bid may name when it is not on a hot channel, with their urls (the
/// crate's channel map).
const CHANNELS: usize = 10_000;

/// Columns of one kind of Nexmark event, at any offset into that kind's events.
pub(super) struct NexmarkColumns {
    kind: EventType,
    /// Event time of the first event, ms since the Unix epoch.
    base_time: u64,
    /// Microseconds of event time between consecutive events (all kinds).
    inter_event_delay: f32,
    first_event_id: usize,
    person_proportion: usize,
    auction_proportion: usize,
    bid_proportion: usize,
    proportion_denominator: usize,
    /// Events between an auction and the auction `in_flight_auctions` later: its
    /// expiry horizon.
    events_for_auctions: usize,
    active_people: usize,
    in_flight_auctions: usize,
    person_id_lead: usize,
    auction_id_lead: usize,
    first_person_id: usize,
    first_auction_id: usize,
    first_category_id: usize,
    num_categories: usize,
    hot_seller_ratio: usize,
    hot_auction_ratio: usize,
    hot_bidder_ratio: usize,
    hot_channel_ratio: usize,
    avg_person_byte_size: usize,
    avg_auction_byte_size: usize,
    avg_bid_byte_size: usize,
    first_names: Vec<String>,
    last_names: Vec<String>,
    cities: Vec<String>,
    states: Vec<String>,
    /// Hot channels with their urls.
    hot_channels: Vec<(String, String)>,
}

impl NexmarkColumns {
    /// Events of `kind` as `config` describes them (see the module doc for what is not
    /// replicated). The config's name, city, state and channel lists must not be empty.
    pub(super) fn new(config: &NexmarkConfig, kind: EventType) -> NexmarkColumns {
        let proportion_denominator = config.person_proportion + config.auction_proportion + config.bid_proportion;
        // As the crate computes it, in f32.
        let inter_event_delay =
            config.us_per_unit as f32 / config.first_rate as f32 * config.num_event_generators as f32;
        NexmarkColumns {
            kind,
            base_time: config.base_time,
            inter_event_delay,
            first_event_id: config.first_event_id,
            person_proportion: config.person_proportion,
            auction_proportion: config.auction_proportion,
            bid_proportion: config.bid_proportion,
            proportion_denominator,
            events_for_auctions: config.in_flight_auctions * proportion_denominator / config.auction_proportion,
            active_people: config.active_people,
            in_flight_auctions: config.in_flight_auctions,
            person_id_lead: config.person_id_lead,
            auction_id_lead: config.auction_id_lead,
            first_person_id: config.first_person_id,
            first_auction_id: config.first_auction_id,
            first_category_id: config.first_category_id,
            num_categories: config.num_categories,
            hot_seller_ratio: config.hot_seller_ratio,
            hot_auction_ratio: config.hot_auction_ratio,
            hot_bidder_ratio: config.hot_bidder_ratio,
            hot_channel_ratio: config.hot_channel_ratio,
            avg_person_byte_size: config.avg_person_byte_size,
            avg_auction_byte_size: config.avg_auction_byte_size,
            avg_bid_byte_size: config.avg_bid_byte_size,
            first_names: config.first_names.clone(),
            last_names: config.last_names.clone(),
            cities: config.us_cities.clone(),
            states: config.us_states.clone(),
            hot_channels: config.hot_channels.iter().cloned().zip(config.hot_urls.iter().cloned()).collect(),
        }
    }

    /// The columns of this kind's events `offset .. offset + n`, in the order of
    /// `GeneratorSpec::schema`.
    pub(super) fn columns(&self, offset: u64, n: usize) -> Result<Vec<ArrayRef>> {
        match self.kind {
            EventType::Person => self.people(offset, n),
            EventType::Auction => self.auctions(offset, n),
            EventType::Bid => self.bids(offset, n),
        }
    }

    /// The event number (over all kinds) of this kind's event `offset`: each block of
    /// `proportion_denominator` events holds people first, then auctions, then bids.
    fn event_number(&self, offset: u64) -> usize {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        let (proportion, before) = match self.kind {
            EventType::Person => (self.person_proportion, 0),
            EventType::Auction => (self.auction_proportion, self.person_proportion),
            EventType::Bid => (self.bid_proportion, self.person_proportion + self.auction_proportion),
        };
        offset / proportion * self.proportion_denominator + before + offset % proportion
    }

    /// Event time of event `event_number`, computed in f32 as the crate does (so it
    /// rounds the same way far into the stream).
    fn timestamp(&self, event_number: usize) -> u64 {
        self.base_time + ((event_number as f32 * self.inter_event_delay) / 1000.0).round() as u64
    }

    /// The newest person id (from 0) at event id `event_id`.
    fn last_person_id(&self, event_id: usize) -> usize {
        let epoch = event_id / self.proportion_denominator;
        let offset = (event_id % self.proportion_denominator).min(self.person_proportion - 1);
        epoch * self.person_proportion + offset
    }

    /// The newest auction id (from 0) at event id `event_id`.
    fn last_auction_id(&self, event_id: usize) -> usize {
        let mut epoch = event_id / self.proportion_denominator;
        let mut offset = event_id % self.proportion_denominator;
        if offset < self.person_proportion {
            epoch = epoch.wrapping_sub(1);
            offset = self.auction_proportion - 1;
        } else if self.person_proportion + self.auction_proportion <= offset {
            offset = self.auction_proportion - 1;
        } else {
            offset -= self.person_proportion;
        }
        epoch.wrapping_mul(self.auction_proportion).wrapping_add(offset)
    }

    /// A random recent person id (from 0).
    fn next_person_id(&self, event_id: usize, rng: &mut SmallRng) -> usize {
        let people = self.last_person_id(event_id) + 1;
        let active = people.min(self.active_people);
        people - active + rng.gen_range(0..active + self.person_id_lead)
    }

    /// A random in-flight auction id (from 0).
    fn next_auction_id(&self, event_id: usize, rng: &mut SmallRng) -> usize {
        let max_auction = self.last_auction_id(event_id);
        let min_auction = max_auction.saturating_sub(self.in_flight_auctions);
        min_auction + rng.gen_range(0..max_auction - min_auction + 1 + self.auction_id_lead)
    }

    fn people(&self, offset: u64, n: usize) -> Result<Vec<ArrayRef>> {
        let mut ids = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        let mut name = TextColumn::with_capacity(n, 12);
        let mut email = TextColumn::with_capacity(n, 17);
        let mut card = TextColumn::with_capacity(n, 19);
        let mut city = TextColumn::with_capacity(n, 8);
        let mut state = TextColumn::with_capacity(n, 2);
        let mut extra = TextColumn::with_capacity(n, self.avg_person_byte_size.saturating_sub(60));
        for i in 0..n as u64 {
            let event_number = self.event_number(offset + i);
            let event_id = self.first_event_id + event_number;
            let rng = &mut SmallRng::seed_from_u64(event_id as u64);
            ids.push(int(self.last_person_id(event_id) + self.first_person_id));
            times.push(int(self.timestamp(event_number)));

            name.push_str(&self.first_names[choose(rng, self.first_names.len())]);
            name.push_str(" ");
            name.push_str(&self.last_names[choose(rng, self.last_names.len())]);

            email.push_letters(rng, 7);
            email.push_str("@");
            email.push_letters(rng, 5);
            email.push_str(".com");

            // Four groups of four digits: "{:04} {:04} {:04} {:04}".
            for group in 0..4 {
                if group > 0 {
                    card.push_str(" ");
                }
                let digits: i32 = rng.gen_range(0..10000);
                card.push_digits(digits as u32, 4);
            }

            city.push_str(&self.cities[choose(rng, self.cities.len())]);
            state.push_str(&self.states[choose(rng, self.states.len())]);

            let size = 8 + [&name, &email, &card, &city, &state].iter().map(|c| c.value_len()).sum::<usize>();
            extra.push_extra(rng, size, self.avg_person_byte_size);
            for column in [&mut name, &mut email, &mut card, &mut city, &mut state, &mut extra] {
                column.end_value();
            }
        }
        Ok(vec![
            Arc::new(Int64Array::from(ids)),
            name.finish()?,
            email.finish()?,
            card.finish()?,
            city.finish()?,
            state.finish()?,
            Arc::new(TimestampMillisecondArray::from(times)),
            extra.finish()?,
        ])
    }

    fn auctions(&self, offset: u64, n: usize) -> Result<Vec<ArrayRef>> {
        // Id, item name (20 letters), description (100 letters) and five numbers.
        const SIZE: usize = 8 + 20 + 100 + 8 + 8 + 8 + 8 + 8;
        let mut ids = Vec::with_capacity(n);
        let mut item_name = TextColumn::with_capacity(n, 20);
        let mut description = TextColumn::with_capacity(n, 100);
        let mut initial_bids = Vec::with_capacity(n);
        let mut reserves = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        let mut expires = Vec::with_capacity(n);
        let mut sellers = Vec::with_capacity(n);
        let mut categories = Vec::with_capacity(n);
        let mut extra = TextColumn::with_capacity(n, self.avg_auction_byte_size.saturating_sub(SIZE));
        for i in 0..n as u64 {
            let event_number = self.event_number(offset + i);
            let event_id = self.first_event_id + event_number;
            let rng = &mut SmallRng::seed_from_u64(event_id as u64);
            let time = self.timestamp(event_number);
            ids.push(int(self.last_auction_id(event_id) + self.first_auction_id));
            times.push(int(time));

            item_name.push_letters(rng, 20);
            item_name.end_value();
            description.push_letters(rng, 100);
            description.end_value();

            let initial_bid = price(rng);
            initial_bids.push(int(initial_bid));
            reserves.push(int(initial_bid + price(rng)));

            let horizon = self.timestamp(event_number + self.events_for_auctions) - time;
            expires.push(int(time + 1 + rng.gen_range(0..(horizon * 2).max(1))));

            // Most auctions are by the hot seller of the latest block of people.
            let seller = if rng.gen_range(0..self.hot_seller_ratio) > 0 {
                self.last_person_id(event_id) / HOT_BLOCK * HOT_BLOCK
            } else {
                self.next_person_id(event_id, rng)
            };
            sellers.push(int(seller + self.first_person_id));
            categories.push(int(self.first_category_id + rng.gen_range(0..self.num_categories)));

            extra.push_extra(rng, SIZE, self.avg_auction_byte_size);
            extra.end_value();
        }
        Ok(vec![
            Arc::new(Int64Array::from(ids)),
            item_name.finish()?,
            description.finish()?,
            Arc::new(Int64Array::from(initial_bids)),
            Arc::new(Int64Array::from(reserves)),
            Arc::new(TimestampMillisecondArray::from(times)),
            Arc::new(TimestampMillisecondArray::from(expires)),
            Arc::new(Int64Array::from(sellers)),
            Arc::new(Int64Array::from(categories)),
            extra.finish()?,
        ])
    }

    fn bids(&self, offset: u64, n: usize) -> Result<Vec<ArrayRef>> {
        // Auction, bidder, price and time.
        const SIZE: usize = 8 + 8 + 8 + 8;
        let channels = channels();
        let mut auctions = Vec::with_capacity(n);
        let mut bidders = Vec::with_capacity(n);
        let mut prices = Vec::with_capacity(n);
        let mut channel = TextColumn::with_capacity(n, 12);
        let mut url = TextColumn::with_capacity(n, 80);
        let mut times = Vec::with_capacity(n);
        let mut extra = TextColumn::with_capacity(n, self.avg_bid_byte_size.saturating_sub(SIZE));
        for i in 0..n as u64 {
            let event_number = self.event_number(offset + i);
            let event_id = self.first_event_id + event_number;
            let rng = &mut SmallRng::seed_from_u64(event_id as u64);
            times.push(int(self.timestamp(event_number)));

            // Most bids are for the hot auction of the latest block of auctions, and by
            // the hot bidder (the block's second person) of the latest block of people.
            let auction = if 0 < rng.gen_range(0..self.hot_auction_ratio) {
                self.last_auction_id(event_id) / HOT_BLOCK * HOT_BLOCK
            } else {
                self.next_auction_id(event_id, rng)
            };
            auctions.push(int(auction + self.first_auction_id));
            let bidder = if 0 < rng.gen_range(0..self.hot_bidder_ratio) {
                self.last_person_id(event_id) / HOT_BLOCK * HOT_BLOCK + 1
            } else {
                self.next_person_id(event_id, rng)
            };
            bidders.push(int(bidder + self.first_person_id));
            prices.push(int(price(rng)));

            let (name, address) = if rng.gen_range(0..self.hot_channel_ratio) > 0 {
                &self.hot_channels[rng.gen_range(0..self.hot_channels.len())]
            } else {
                &channels[choose(rng, channels.len())]
            };
            channel.push_str(name);
            channel.end_value();
            url.push_str(address);
            url.end_value();

            extra.push_extra(rng, SIZE, self.avg_bid_byte_size);
            extra.end_value();
        }
        Ok(vec![
            Arc::new(Int64Array::from(auctions)),
            Arc::new(Int64Array::from(bidders)),
            Arc::new(Int64Array::from(prices)),
            channel.finish()?,
            url.finish()?,
            Arc::new(TimestampMillisecondArray::from(times)),
            extra.finish()?,
        ])
    }
}

/// A string column being written: its bytes and value offsets. Cheaper than a
/// `StringBuilder` for values written a letter at a time: the letters go into a plain
/// byte vector, and UTF-8 is checked once per column in [`TextColumn::finish`].
struct TextColumn {
    values: Vec<u8>,
    /// Where each finished value ends (the first offset is 0).
    offsets: Vec<i32>,
    /// Where the value being written starts.
    start: usize,
}

impl TextColumn {
    /// Room for `n` values of about `average` bytes.
    fn with_capacity(n: usize, average: usize) -> TextColumn {
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        TextColumn { values: Vec::with_capacity(n * average), offsets, start: 0 }
    }

    fn push_str(&mut self, text: &str) {
        self.values.extend_from_slice(text.as_bytes());
    }

    /// `len` random lowercase letters.
    fn push_letters(&mut self, rng: &mut SmallRng, len: usize) {
        self.values.extend((0..len).map(|_| rng.gen_range(b'a'..=b'z')));
    }

    /// `value` in decimal, zero-padded to `width` digits.
    fn push_digits(&mut self, value: u32, width: u32) {
        for place in (0..width).rev() {
            self.values.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
        }
    }

    /// The `extra` padding that brings an event of `size` bytes to `average` bytes on
    /// average: letters, within 20% either side of the missing size.
    fn push_extra(&mut self, rng: &mut SmallRng, size: usize, average: usize) {
        if size > average {
            return;
        }
        let missing = average - size;
        let delta = (missing + 2) / 5;
        let len = missing - delta + if delta == 0 { 0 } else { rng.gen_range(0..2 * delta) };
        self.push_letters(rng, len);
    }

    /// Bytes written to the current value so far.
    fn value_len(&self) -> usize {
        self.values.len() - self.start
    }

    /// Ends the current value; what is written next starts a new one.
    fn end_value(&mut self) {
        self.start = self.values.len();
        // Lengths past i32::MAX are refused in `finish`, so no offset is ever cut short.
        self.offsets.push(self.start as i32);
    }

    fn finish(self) -> Result<ArrayRef> {
        if i32::try_from(self.values.len()).is_err() {
            return Err(Error::Internal(format!(
                "a nexmark batch of {} events has more than 2 GiB in one string column",
                self.offsets.len() - 1
            )));
        }
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.offsets));
        // Sources and the views over them keep these buffers as they are: room reserved
        // for longer values than were written would be held for as long as the rows.
        let values = match self.values.capacity() - self.values.len() > self.values.len() / 16 {
            true => Buffer::from_slice_ref(&self.values),
            false => Buffer::from_vec(self.values),
        };
        Ok(Arc::new(StringArray::try_new(offsets, values, None)?))
    }
}

/// A column value: ids, prices and times fit an i64 by far; saturate rather than wrap.
fn int<T: TryInto<i64>>(value: T) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// The index `SliceRandom::choose` picks in a slice of `len` (not empty) elements.
fn choose(rng: &mut SmallRng, len: usize) -> usize {
    rng.gen_range(0..len as u32) as usize
}

/// A price in cents, log-uniform from $1 to $1,000,000 (rounded as the crate rounds, in
/// f32).
fn price(rng: &mut SmallRng) -> usize {
    (10.0_f32.powf(rng.r#gen::<f32>() * 6.0) * 100.0).round() as usize
}

/// The crate's channel map: `channel-{i}` and its url, for i below [`CHANNELS`]; built
/// once per process.
fn channels() -> &'static [(String, String)] {
    static CHANNEL_MAP: OnceLock<Vec<(String, String)>> = OnceLock::new();
    CHANNEL_MAP.get_or_init(|| {
        (0..CHANNELS)
            .map(|i| {
                let mut url = base_url(i as u64);
                // Nine in ten channels carry their id in the url.
                let mut rng = SmallRng::seed_from_u64(i as u64);
                if rng.gen_range(0..10) > 0 {
                    url.push_str("&channel_id=");
                    url.push_str(&i64::abs((i as i32).reverse_bits() as i64).to_string());
                }
                (format!("channel-{i}"), url)
            })
            .collect()
    })
}

/// An item url with three random path segments, from `seed`.
fn base_url(seed: u64) -> String {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut url = String::from("https://www.nexmark.com");
    for _ in 0..3 {
        url.push('/');
        // 3 or 4 characters, each a letter or (one in 13) an underscore.
        let len = rng.gen_range(3..5usize);
        for _ in 0..len {
            if rng.gen_range(0..13) == 0 {
                url.push('_');
            } else {
                url.push(char::from(rng.gen_range(b'a'..=b'z')));
            }
        }
    }
    url.push_str("/item.htm?query=1");
    url
}

#[cfg(test)]
pub(super) mod tests {
    use datafusion::arrow::array::{Array, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
    use datafusion::arrow::util::display::array_value_to_string;
    use nexmark::event::Event;

    use super::*;
    use crate::connectors::generator::{GeneratorKind, GeneratorSpec};

    /// The columns of the crate's own events: this kind's events `offset .. offset + n`.
    pub(in crate::connectors) fn crate_columns(
        config: NexmarkConfig,
        kind: EventType,
        offset: u64,
        n: usize,
    ) -> Vec<ArrayRef> {
        let events = nexmark::EventGenerator::new(config).with_type_filter(kind).with_offset(offset);
        let mut ints: Vec<Int64Builder> = (0..5).map(|_| Int64Builder::with_capacity(n)).collect();
        let mut texts: Vec<StringBuilder> = (0..6).map(|_| StringBuilder::new()).collect();
        let mut times: Vec<TimestampMillisecondBuilder> =
            (0..2).map(|_| TimestampMillisecondBuilder::with_capacity(n)).collect();
        for event in events.take(n) {
            match event {
                Event::Bid(b) => {
                    ints[0].append_value(int(b.auction));
                    ints[1].append_value(int(b.bidder));
                    ints[2].append_value(int(b.price));
                    texts[0].append_value(&b.channel);
                    texts[1].append_value(&b.url);
                    times[0].append_value(int(b.date_time));
                    texts[2].append_value(&b.extra);
                }
                Event::Auction(a) => {
                    ints[0].append_value(int(a.id));
                    texts[0].append_value(&a.item_name);
                    texts[1].append_value(&a.description);
                    ints[1].append_value(int(a.initial_bid));
                    ints[2].append_value(int(a.reserve));
                    times[0].append_value(int(a.date_time));
                    times[1].append_value(int(a.expires));
                    ints[3].append_value(int(a.seller));
                    ints[4].append_value(int(a.category));
                    texts[2].append_value(&a.extra);
                }
                Event::Person(p) => {
                    ints[0].append_value(int(p.id));
                    texts[0].append_value(&p.name);
                    texts[1].append_value(&p.email_address);
                    texts[2].append_value(&p.credit_card);
                    texts[3].append_value(&p.city);
                    texts[4].append_value(&p.state);
                    times[0].append_value(int(p.date_time));
                    texts[5].append_value(&p.extra);
                }
            }
        }
        let mut int = |i: usize| Arc::new(ints[i].finish()) as ArrayRef;
        let mut text = |i: usize| Arc::new(texts[i].finish()) as ArrayRef;
        let mut time = |i: usize| Arc::new(times[i].finish()) as ArrayRef;
        match kind {
            EventType::Bid => vec![int(0), int(1), int(2), text(0), text(1), time(0), text(2)],
            EventType::Auction => {
                vec![int(0), text(0), text(1), int(1), int(2), time(0), time(1), int(3), int(4), text(2)]
            }
            EventType::Person => vec![int(0), text(0), text(1), text(2), text(3), text(4), time(0), text(5)],
        }
    }

    fn config(base_time: u64, event_rate: usize) -> NexmarkConfig {
        NexmarkConfig { base_time, first_rate: event_rate, next_rate: event_rate, ..Default::default() }
    }

    /// Asserts that two column lists of `kind` are equal, naming the first differing
    /// column and row.
    fn assert_same(ours: &[ArrayRef], theirs: &[ArrayRef], kind: EventType, case: &str) {
        let spec =
            GeneratorSpec { kind: GeneratorKind::Nexmark(kind), rate: 0, events: None, base_time: 0, event_rate: None };
        let schema = spec.schema();
        assert_eq!(ours.len(), schema.fields().len(), "{case}: one array per column of the schema");
        assert_eq!(theirs.len(), ours.len(), "{case}");
        for ((field, ours), theirs) in schema.fields().iter().zip(ours).zip(theirs) {
            assert_eq!(ours.data_type(), field.data_type(), "{case}: {}", field.name());
            assert_eq!(ours.len(), theirs.len(), "{case}: {} rows", field.name());
            if ours != theirs {
                let row = (0..ours.len()).find(|&i| ours.slice(i, 1) != theirs.slice(i, 1)).unwrap_or(0);
                let show = |a: &ArrayRef| array_value_to_string(a, row).unwrap_or_default();
                panic!(
                    "{case}: {kind:?} column {} differs first at row {row}: ours {:?}, the crate's {:?}",
                    field.name(),
                    show(ours),
                    show(theirs)
                );
            }
        }
    }

    #[test]
    fn every_column_equals_the_crates_events() {
        let cases = [
            ("default config", config(1_700_000_000_000, 10_000), 0),
            ("default config, mid-stream", config(1_700_000_000_000, 10_000), 1_234_567),
            // Event numbers past 2^24, where the crate's f32 timestamps round.
            ("default config, far into the stream", config(1_700_000_000_000, 10_000), 40_000_000),
            ("base_time 1234, 500 events per second", config(1234, 500), 0),
            ("a million events per second", config(1_700_000_000_000, 1_000_000), 777_777),
        ];
        for kind in [EventType::Bid, EventType::Auction, EventType::Person] {
            for (name, config, offset) in &cases {
                let ours = NexmarkColumns::new(config, kind).columns(*offset, 20_000).expect("columns");
                let theirs = crate_columns(config.clone(), kind, *offset, 20_000);
                assert_same(&ours, &theirs, kind, &format!("{name}, from offset {offset}"));
            }
        }
    }

    #[test]
    fn batches_split_anywhere_continue_the_crates_sequence() {
        let config = config(1_700_000_000_000, 10_000);
        for kind in [EventType::Bid, EventType::Auction, EventType::Person] {
            let columns = NexmarkColumns::new(&config, kind);
            let theirs = crate_columns(config.clone(), kind, 0, 30_000);
            let mut start = 0;
            for len in [1, 12_344, 8192, 9463] {
                let slices: Vec<ArrayRef> = theirs.iter().map(|c| c.slice(start, len)).collect();
                let case = format!("events {start}..{}", start + len);
                assert_same(&columns.columns(start as u64, len).expect("columns"), &slices, kind, &case);
                start += len;
            }
            assert_eq!(start, 30_000);
        }
    }

    #[test]
    fn a_nexmark_source_emits_the_crates_events() {
        for (kind, name) in [(EventType::Bid, "bid"), (EventType::Auction, "auction"), (EventType::Person, "person")] {
            let options: crate::connectors::Options =
                [("connector", "nexmark"), ("kind", name), ("base_time", "1700000000000"), ("event_rate", "500")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            let spec = GeneratorSpec::from_options(&options).expect("valid").expect("a generator");
            let mut source = spec.open(5_000);
            let batch = source.next_batch(10_000).expect("rows");
            assert_eq!(source.position(), 15_000);
            let theirs = crate_columns(config(1_700_000_000_000, 500), kind, 5_000, 10_000);
            assert_same(batch.columns(), &theirs, kind, name);
        }
    }
}
