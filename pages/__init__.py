"""The pages a person looks at: the data card (witforge card) and the browser used to test them."""
