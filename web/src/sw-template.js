/* sessiond app-shell service worker (hand-written; vite.config.ts fills in VERSION and PRECACHE at build time).
 *
 * - install: cache this build's shell (index, hashed assets, icons, manifest), then take over at once;
 * - activate: drop the caches of older builds;
 * - navigations: network first (a new build shows up at once), the cached index.html when the server or the
 *   network is down, so the app opens offline and shows its offline state;
 * - /app/config.json: network first, cached copy offline (the app needs the WebSocket port);
 * - everything else in scope: cache first (hashed names never change), then network.
 * The REST API (/v1) and the WebSocket are outside the scope: never cached.
 */
const VERSION = __VERSION__;
const PRECACHE = [...__PRECACHE__, "config.json"]; // config: refreshed by every online load (network first)
const PREFIX = "sessiond-shell-";
const CACHE = PREFIX + VERSION;

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(PRECACHE.map((path) => new Request(path, { cache: "reload" }))))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    (async () => {
      for (const key of await caches.keys()) {
        if (key.startsWith(PREFIX) && key !== CACHE) await caches.delete(key);
      }
      await self.clients.claim();
    })(),
  );
});

async function networkFirst(request, fallbackKey) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.ok && !fallbackKey) await cache.put(request, response.clone());
    return response;
  } catch (error) {
    const cached = await cache.match(fallbackKey || request, { ignoreSearch: true });
    if (cached) return cached;
    throw error;
  }
}

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const cached = await cache.match(request);
  if (cached) return cached;
  const response = await fetch(request);
  if (response.ok) await cache.put(request, response.clone());
  return response;
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  const scope = new URL(self.registration.scope);
  if (url.origin !== scope.origin || !url.pathname.startsWith(scope.pathname)) return;
  if (request.mode === "navigate") {
    event.respondWith(networkFirst(request, new URL("./", scope).href));
  } else if (url.pathname === scope.pathname + "config.json") {
    event.respondWith(networkFirst(request));
  } else {
    event.respondWith(cacheFirst(request));
  }
});

self.addEventListener("message", (event) => {
  if (event.data === "version" && event.source) event.source.postMessage({ version: VERSION });
});
