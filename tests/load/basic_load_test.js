// The seed's load test: browse, pet details, order placement and status polling against a
// running petstore.
//
//   k6 run tests/load/basic_load_test.js                         # http://localhost:8080, 10 VUs, 30 s
//   BASE_URL=http://127.0.0.1:9000 K6_VUS=50 K6_DURATION=2m k6 run tests/load/basic_load_test.js
//   SMOKE=1 k6 run tests/load/basic_load_test.js                 # 1 VU, 5 s (CI: scripts/load.sh --smoke)
//
// Every iteration is one customer: browse dogs, look at a pet, order a random pet of the demo
// catalog with a fresh Idempotency-Key, and poll the order's status until the saga settles it
// (completed or cancelled, bounded). A pet is sold once, so most orders end cancelled with
// `pet-unavailable`: that is the saga working; 202 is the success of a placement.
//
// Only 5xx and network errors count as failed requests (4xx such as a 404 or 409 while the
// read model catches up are answers). Thresholds fail the run (k6 exits non-zero).
import http from 'k6/http';
import exec from 'k6/execution';
import { check, group, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://localhost:8080').replace(/\/+$/, '');
const API = `${BASE_URL}/petstore-domain`;
const SMOKE = ['1', 'true', 'yes'].includes((__ENV.SMOKE || '').toLowerCase());
// k6 itself also reads K6_VUS and K6_DURATION (they override these options either way).
const VUS = parseInt(__ENV.K6_VUS || (SMOKE ? '1' : '10'), 10);
const DURATION = __ENV.K6_DURATION || (SMOKE ? '5s' : '30s');
// Status polling: at most MAX_POLLS requests, POLL_INTERVAL seconds apart (about 15 s).
const MAX_POLLS = parseInt(__ENV.MAX_POLLS || '60', 10);
const POLL_INTERVAL = parseFloat(__ENV.POLL_INTERVAL || '0.25');
// Pause between iterations, seconds (0 for a closed loop at full speed).
const THINK_TIME = parseFloat(__ENV.THINK_TIME || '0.5');
// Orders and their status need a token: setup() logs in as this user (config/local.yaml's
// demo user, customer-001, by default).
const USERNAME = __ENV.USERNAME || 'demo';
const PASSWORD = __ENV.PASSWORD || 'demo';

// The demo catalog (config catalog.seed_demo_pets).
const PETS = [
  'golden-retriever-001', 'labrador-001', 'beagle-001', 'corgi-001',
  'persian-cat-001', 'siamese-cat-001', 'maine-coon-001',
  'budgie-001', 'cockatiel-001', 'african-grey-001',
  'goldfish-001', 'betta-001', 'clownfish-001', 'leopard-gecko-001',
];
const TERMINAL = ['completed', 'cancelled'];

const ordersSettled = new Rate('orders_settled');
const orderSettleTime = new Trend('order_settle_time', true);
const ordersCompleted = new Counter('orders_completed');
const ordersCancelled = new Counter('orders_cancelled');

export const options = {
  vus: VUS,
  duration: DURATION,
  thresholds: {
    // 5xx and network errors (see setResponseCallback below).
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    'http_req_duration{name:browse}': ['p(95)<500'],
    'http_req_duration{name:pet_details}': ['p(95)<500'],
    'http_req_duration{name:place_order}': ['p(95)<1000'],
    // A status read with X-Consistency-Token may wait for the projector (up to 2 s).
    'http_req_duration{name:order_status}': ['p(95)<2000'],
    // The saga settles (almost) every order within the polling bound.
    orders_settled: ['rate>0.95'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

// 4xx are answers, not failures: http_req_failed counts 5xx and network errors only.
http.setResponseCallback(http.expectedStatuses({ min: 200, max: 499 }));

function json(response) {
  try {
    return response.json();
  } catch (_) {
    return null;
  }
}

function uniqueId(prefix) {
  const random = Math.random().toString(36).slice(2, 10);
  return `${prefix}-${exec.vu.idInTest}-${exec.vu.iterationInInstance}-${Date.now().toString(36)}-${random}`;
}

export function setup() {
  const response = http.get(`${API}/health/ready`, { tags: { name: 'ready' } });
  if (response.status !== 200) {
    throw new Error(`${API}/health/ready answered ${response.status}: is the service running at ${BASE_URL}?`);
  }
  const login = http.post(`${BASE_URL}/auth/login`, JSON.stringify({ username: USERNAME, password: PASSWORD }), {
    headers: { 'Content-Type': 'application/json' },
    tags: { name: 'login' },
  });
  const token = json(login);
  if (login.status !== 200 || token === null) {
    throw new Error(`logging in as ${USERNAME} answered ${login.status}`);
  }
  return { token: token.token };
}

export default function (data) {
  const correlationId = uniqueId('k6');
  const headers = { 'X-Correlation-ID': correlationId, Authorization: `Bearer ${data.token}` };

  group('browse', () => {
    const response = http.get(`${API}/pets/browse?category=dog`, { headers, tags: { name: 'browse' } });
    const body = json(response);
    check(response, {
      'browse: 200': (r) => r.status === 200,
      'browse: only dogs': () => body !== null && Array.isArray(body.pets)
        && body.pets.every((pet) => pet.category === 'dog'),
    });
  });

  group('pet details', () => {
    const response = http.get(`${API}/pets/golden-retriever-001`, { headers, tags: { name: 'pet_details' } });
    const body = json(response);
    check(response, {
      'pet details: 200': (r) => r.status === 200,
      'pet details: the pet asked for': () => body !== null && body.id === 'golden-retriever-001',
    });
  });

  let order = null;
  group('order placement', () => {
    const petId = PETS[Math.floor(Math.random() * PETS.length)];
    const response = http.post(
      `${API}/orders`,
      JSON.stringify({
        customer_id: 'customer-001',
        pet_id: petId,
        special_instructions: 'Load test order: please include the vaccination records',
      }),
      {
        headers: {
          ...headers,
          'Content-Type': 'application/json',
          'Idempotency-Key': uniqueId('order'),
        },
        tags: { name: 'place_order' },
      },
    );
    const body = json(response);
    const accepted = check(response, {
      'place order: 202': (r) => r.status === 202,
      'place order: order id': () => body !== null && typeof body.order_id === 'string' && body.order_id.length > 0,
    });
    if (accepted) {
      order = {
        id: body.order_id,
        consistencyToken: response.headers['X-Consistency-Token'],
        placedAt: Date.now(),
      };
    }
  });

  if (order !== null) {
    group('status polling', () => {
      const pollHeaders = { ...headers };
      if (order.consistencyToken) {
        pollHeaders['X-Consistency-Token'] = order.consistencyToken;
      }
      let status = null;
      for (let poll = 0; poll < MAX_POLLS; poll += 1) {
        const response = http.get(`${API}/orders/${order.id}/status`, {
          headers: pollHeaders,
          tags: { name: 'order_status' },
        });
        // 404 (not projected yet) and 409 (consistency wait timed out) are worth a retry.
        check(response, {
          'order status: 200, or 404/409 while the read model catches up':
            (r) => r.status === 200 || r.status === 404 || r.status === 409,
        });
        const body = response.status === 200 ? json(response) : null;
        if (body !== null && TERMINAL.includes(body.status)) {
          status = body.status;
          break;
        }
        sleep(POLL_INTERVAL);
      }
      ordersSettled.add(status !== null);
      if (status !== null) {
        orderSettleTime.add(Date.now() - order.placedAt);
        (status === 'completed' ? ordersCompleted : ordersCancelled).add(1);
      }
    });
  }

  sleep(THINK_TIME);
}
