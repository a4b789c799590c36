"""The Locust peer of bench/bots.sh throughput: the flow of bench/bots/shop-throughput.yaml.

Each iteration is one session without think time: login (extract the token) → browse
(extract the first product id, check the page is not empty) → add to cart → checkout,
each status-checked (409 is accepted for cart and checkout, as in the LoadTest).
FastHttpUser: geventhttpclient, Locust's fastest client.
"""

import itertools

from locust import FastHttpUser, constant, task

_ids = itertools.count()


class ShopUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.uid = next(_ids)

    @task
    def flow(self):
        with self.client.post(
            "/api/login", json={"user": f"locust-{self.uid}"}, name="login", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"login: status {r.status_code}")
                return
            token = (r.json() or {}).get("token")
            if not token:
                r.failure("login: no token")
                return
        auth = {"authorization": f"Bearer {token}"}
        with self.client.get(
            f"/api/products?page={self.uid % 5 + 1}", headers=auth, name="browse", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"browse: status {r.status_code}")
                return
            items = (r.json() or {}).get("items") or []
            if not items:
                r.failure("browse: no items")
                return
            product = items[0]["id"]
        with self.client.post(
            "/api/cart",
            json={"product": str(product), "quantity": 1},
            headers=auth,
            name="addToCart",
            catch_response=True,
        ) as r:
            if r.status_code in (200, 409):
                r.success()
            else:
                r.failure(f"addToCart: status {r.status_code}")
        with self.client.post("/api/checkout", headers=auth, name="checkout", catch_response=True) as r:
            if r.status_code in (200, 409):
                r.success()
            else:
                r.failure(f"checkout: status {r.status_code}")
