// A small, real OpenID Provider (oidc-provider 9) for the petstore tests.
//
//   node tests/oidc/provider.mjs --port PORT --kid KID
//
// Listens on 127.0.0.1 only (PORT 0 picks a free port). The issuer is exactly
// `http://127.0.0.1:<actual port>` (no trailing slash). Each start generates a fresh RSA 2048
// signing key (RS256) with the given kid and publishes only that key at the jwks_uri, so
// restarting on the same port with another --kid is a key rotation.
//
// When it listens it prints exactly one line to stdout, a JSON object
//   {"issuer":"http://127.0.0.1:PORT","port":PORT,"kid":"KID"}
// and nothing else: everything else (oidc-provider's development notices, errors) goes to stderr.
// SIGTERM and SIGINT end it with exit code 0.
//
// Tokens: the client credentials grant at the token endpoint (`/token`, see the discovery
// document), client authentication by client_secret_basic or client_secret_post (oidc-provider
// accepts either for a client registered with one of the two). The access tokens are RFC 9068
// JWTs (header typ "at+jwt", RS256, kid) whose `sub` and `client_id` are the client id; `aud`
// is a single string; there is no `nbf`; `scope` is there only when the request asks for one
// the resource has (scope=orders). The `roles` (and `customer_id`) claims come from the client's
// metadata. oidc-provider URL-decodes the Basic credentials (RFC 6749 2.3.1): `shop|app.1` works
// as it is or as `shop%7Capp.1`.
//
// Sign-in (the console's): the authorization code flow with PKCE for the public, native client
// `petstore-console` (`token_endpoint_auth_method: none`, so PKCE is required), whose redirect
// URI is the console's callback on 127.0.0.1 or localhost at any port (RFC 8252 7.3: a native
// client's loopback redirect may use any port). oidc-provider's development interactions serve the login
// and consent pages: any login name with any password signs in as the account of that name.
// The account `console-admin` has the role admin, `console-customer` the role customer, any other
// none; the roles go into the access tokens issued for the account (the `roles` claim).
//
// Resource indicators (RFC 8707): `resource=urn:petstore:api` (audience petstore-api, scope
// orders, 600 s), `resource=urn:petstore:short-lived` (audience petstore-api, 1 s: a token that
// expires), `resource=urn:other:api` (audience other-api). Any other resource is refused with
// invalid_target. A request without `resource` gets the default resource urn:petstore:api
// (features.resourceIndicators.defaultResource below); without that default, oidc-provider
// would issue an opaque token with no audience instead of a JWT.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

// oidc-provider prints its development NOTICEs with console.info, i.e. to stdout: stdout must
// carry only the one JSON line, so the console's stdout methods are sent to stderr.
console.log = console.error;
console.info = console.error;
console.debug = console.error;

const { default: Provider, errors } = await import('oidc-provider');

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    kid: { type: 'string' },
  },
  strict: true,
});
const port = Number(args.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`--port must be an integer from 0 to 65535, got ${args.port}`);
  process.exit(2);
}
if (!args.kid) {
  console.error('usage: node provider.mjs --port PORT --kid KID');
  process.exit(2);
}
const { kid } = args;

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' };

const PETSTORE_API = 'urn:petstore:api';
const RESOURCE_SERVERS = {
  [PETSTORE_API]: { audience: 'petstore-api', scope: 'orders', accessTokenTTL: 600 },
  'urn:petstore:short-lived': { audience: 'petstore-api', scope: 'orders', accessTokenTTL: 1 },
  'urn:other:api': { audience: 'other-api', scope: 'orders', accessTokenTTL: 600 },
};

// Static clients: the console's, and machines with the client credentials grant. `roles` and
// `customer_id` are extra client metadata (extraClientMetadata.properties) that
// extraTokenClaims copies into the machines' access tokens.
const machineClient = (clientId, secret, extra) => ({
  client_id: clientId,
  client_secret: secret,
  token_endpoint_auth_method: 'client_secret_basic',
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  ...extra,
});
const CONSOLE_CALLBACK = '/petstore-domain/console/login/oidc/callback';
const ACCOUNT_ROLES = {
  'console-admin': ['admin'],
  'console-customer': ['customer'],
};
const clients = [
  {
    client_id: 'petstore-console',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: [`http://127.0.0.1${CONSOLE_CALLBACK}`, `http://localhost${CONSOLE_CALLBACK}`],
  },
  machineClient('petstore-admin', 'admin-secret', { roles: ['admin'] }),
  machineClient('customer-001', 'customer-secret', { roles: ['customer'] }),
  machineClient('customer-002', 'customer-secret', { roles: ['customer'] }),
  // A client id outside [A-Za-z0-9-_.@+], for a configurable customer claim.
  machineClient('shop|app.1', 'shop-secret', { roles: ['customer'], customer_id: 'customer-003' }),
];

const configuration = {
  clients,
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  extraClientMetadata: {
    properties: ['roles', 'customer_id'],
    validator(_ctx, key, value) {
      if (value === undefined) return;
      if (key === 'roles' && !(Array.isArray(value) && value.every((r) => typeof r === 'string'))) {
        throw new errors.InvalidClientMetadata('roles must be an array of strings');
      }
      if (key === 'customer_id' && typeof value !== 'string') {
        throw new errors.InvalidClientMetadata('customer_id must be a string');
      }
    },
  },
  async extraTokenClaims(ctx, token) {
    if (token.accountId !== undefined) {
      return { roles: [...(ACCOUNT_ROLES[token.accountId] ?? [])] };
    }
    const client = token.client ?? ctx?.oidc?.client;
    if (!client) return undefined;
    const claims = {};
    if (client.roles !== undefined) claims.roles = [...client.roles];
    if (client.customer_id !== undefined) claims.customer_id = client.customer_id;
    return claims;
  },
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Called with (ctx, client) when the request has no `resource`, and with (ctx, client,
      // oneOf) to pick one of several granted resources (not used by client credentials).
      async defaultResource(_ctx, _client, oneOf) {
        return oneOf ?? PETSTORE_API;
      },
      async getResourceServerInfo(_ctx, resourceIndicator) {
        const server = RESOURCE_SERVERS[resourceIndicator];
        if (!server) throw new errors.InvalidTarget();
        return {
          ...server,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  ttl: {
    // The resource server's accessTokenTTL (the default functions do the same, with a notice).
    AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 600,
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 600,
  },
  clientBasedCORS: () => false,
};

const server = createServer();
const connections = new Set();
server.on('connection', (socket) => {
  connections.add(socket);
  socket.on('close', () => connections.delete(socket));
});
server.on('error', (err) => {
  console.error(`oidc test provider: ${err.message}`);
  process.exit(1);
});

server.listen(port, '127.0.0.1', () => {
  const actualPort = server.address().port;
  const issuer = `http://127.0.0.1:${actualPort}`;
  let provider;
  try {
    provider = new Provider(issuer, configuration);
  } catch (err) {
    console.error(err);
    process.exit(1);
  }
  for (const event of ['server_error', 'grant.error', 'jwks.error', 'discovery.error']) {
    provider.on(event, (_ctx, err) => console.error(`oidc test provider ${event}:`, err?.message ?? err));
  }
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer, port: actualPort, kid })}\n`);
});

function shutdown() {
  server.close(() => process.exit(0));
  for (const socket of connections) socket.destroy();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
