// A pinned local authorization server for benches/tradeoff.rs: oidc-provider (see
// package.json / package-lock.json) with one confidential client that may use the
// client_credentials grant, opaque access tokens, and the RFC 7662 introspection endpoint.
//
//   npm ci --no-audit --no-fund            # once, in this folder
//   node server.mjs [PORT]                 # or PORT=… node server.mjs; 0 picks a free port
//
// Prints one line to stdout when it listens, for the bench to read:
//   ready {"issuer":…,"token_endpoint":…,"introspection_endpoint":…,"client_id":…,"client_secret":…}
//
// Choices, and why:
// - Tokens are opaque: a client_credentials token without a resource indicator is an
//   opaque ClientCredentials token (oidc-provider only issues a JWT access token for a
//   resource server whose getResourceServerInfo says accessTokenFormat 'jwt'; the
//   introspection endpoint even rejects structured tokens). The bench checks this too.
// - Storage: oidc-provider's bundled MemoryAdapter is an LRU of 1000 entries, so a pool of
//   more tokens would silently be evicted (introspection would answer active:false). This
//   file uses a plain Map adapter instead: every lookup is an in-process hash-map read,
//   the cheapest possible store — a best case for introspection (a real deployment adds
//   a Redis/SQL round trip per introspection).
// - One Node.js process (one JS thread), as oidc-provider is usually run per instance.
// - The signing key is generated at start (no dev keys, no warning about them).
// - Runtime: oidc-provider 9.x declares Node.js 22 LTS or later its supported runtime and
//   prints "Unsupported runtime" on Node.js 20, but runs there (this is what the bench was
//   first run with); the 8.x line supported Node 18/20 officially but is the previous major.
//   REVSYNC_BENCH_NODE points the bench at another node binary.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
const clientId = process.env.INTROSPECTION_CLIENT_ID ?? 'bench-rs';
const clientSecret = process.env.INTROSPECTION_CLIENT_SECRET ?? randomBytes(24).toString('hex');
const host = '127.0.0.1';

// A Map-backed adapter with expiry (see above). Only what client_credentials and
// introspection need is exercised, but the full adapter interface is present.
const stores = new Map();
class MapAdapter {
  constructor(model) {
    this.model = model;
    if (!stores.has(model)) stores.set(model, new Map());
    this.store = stores.get(model);
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    this.store.set(id, { payload, expiresAt });
  }

  async find(id) {
    const e = this.store.get(id);
    if (!e) return undefined;
    if (e.expiresAt <= Date.now()) {
      this.store.delete(id);
      return undefined;
    }
    return e.payload;
  }

  async findByUserCode(userCode) {
    for (const [id, e] of this.store) if (e.payload.userCode === userCode) return this.find(id);
    return undefined;
  }

  async findByUid(uid) {
    for (const [id, e] of this.store) if (e.payload.uid === uid) return this.find(id);
    return undefined;
  }

  async consume(id) {
    const e = this.store.get(id);
    if (e) e.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    this.store.delete(id);
  }

  async revokeByGrantId(grantId) {
    for (const m of stores.values()) {
      for (const [id, e] of m) if (e.payload.grantId === grantId) m.delete(id);
    }
  }
}

const server = createServer();
server.keepAliveTimeout = 60_000; // idle keep-alive connections between bench runs
server.headersTimeout = 65_000;
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, host, resolve);
});
const issuer = `http://${host}:${server.address().port}`;

// RS256 is oidc-provider's default for everything it signs (never used for opaque tokens).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'bench-rs256', alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  adapter: MapAdapter,
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
      scope: 'api:read',
    },
  ],
  scopes: ['api:read'],
  jwks: { keys: [jwk] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // A confidential client may introspect any token of this server.
      allowedPolicy: async (ctx, client) => client.clientAuthMethod !== 'none',
    },
    revocation: { enabled: false },
  },
  ttl: {
    // Long enough for every run of a bench that mints its pool once.
    ClientCredentials: 4 * 3600,
  },
});
provider.on('server_error', (_ctx, err) => console.error('server_error', err));

server.on('request', provider.callback());

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

console.log(
  `ready ${JSON.stringify({
    issuer,
    token_endpoint: `${issuer}/token`,
    introspection_endpoint: `${issuer}/token/introspection`,
    client_id: clientId,
    client_secret: clientSecret,
    node: process.version,
    oidc_provider: (await import('oidc-provider/package.json', { with: { type: 'json' } })
      .then((m) => m.default.version)
      .catch(() => 'unknown')),
  })}`,
);
